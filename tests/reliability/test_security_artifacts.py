"""Model artifacts load only from where they should, and a hostile ``model.tar.gz`` cannot write
outside its folder, fill the disk or leave a half-unpacked model behind.

Each crafted archive is refused by ``training.archive.safe_extract`` with a message naming the
archive, the member and the problem; afterwards the folder around the target is exactly as it was
(the sentinel files the archive aims at are untouched, no target, no partial folder). Every place
that unpacks a model archive (the model server, the evaluation job, the local backend's
``extract_model``, SageMaker's ``archive_metrics``) goes through it. The archives this project
writes, packed by the local backend or SageMaker-style with ``tar -C model .``, still unpack and
serve. The model server loads adapters only from real folders inside the model folder, under
plain names, on a base model from the allowed folders, and never from the Hugging Face Hub.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from training.archive import ArchiveError, model_archive_limits, read_member, safe_extract

pytestmark = pytest.mark.reliability("security")

MiB = 2**20
GiB = 2**30
LIMITS = {"max_bytes": 64 * MiB, "max_members": 4096}
ARCHIVE = "crafted.tar.gz"


# -- crafting archives ----------------------------------------------------------------------------


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, size, 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def pack(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A gzip-compressed tar of the members, written as given (no name clean-up)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file(name: str, data: bytes = b"payload") -> tuple[tarfile.TarInfo, bytes]:
    return _info(name), data


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    return _info(name, kind, linkname=target), None


def raw_tar(*members: tuple[tarfile.TarInfo, bytes], end: bool = True) -> bytes:
    """An uncompressed tar stream, optionally without its end-of-archive marker."""
    out = bytearray()
    for info, data in members:
        info.size = len(data)
        out += info.tobuf(tarfile.USTAR_FORMAT)
        out += data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    if end:
        out += b"\0" * (2 * tarfile.BLOCKSIZE)
    return bytes(out)


_ZEROS_16M = None


def zeros_16m() -> bytes:
    """16 MiB of zeros as one gzip member (16 KiB): gzip members concatenate into one stream, so a
    bomb of any size is this block repeated, built without compressing gigabytes."""
    global _ZEROS_16M
    if _ZEROS_16M is None:
        _ZEROS_16M = gzip.compress(b"\0" * (16 * MiB), compresslevel=9, mtime=0)
    return _ZEROS_16M


def bomb_one_member(total: int) -> bytes:
    header = _info("model.safetensors", size=total).tobuf(tarfile.GNU_FORMAT)
    return gzip.compress(header, mtime=0) + zeros_16m() * (total // (16 * MiB)) + gzip.compress(b"\0" * 1024)


def bomb_many_members(total: int) -> bytes:
    parts = []
    for i in range(total // (16 * MiB)):
        parts.append(gzip.compress(_info(f"shard-{i:04d}.bin", size=16 * MiB).tobuf(tarfile.USTAR_FORMAT), mtime=0))
        parts.append(zeros_16m())
    return b"".join(parts) + gzip.compress(b"\0" * 1024)


def bomb_after_end(total: int) -> bytes:
    return pack(file("adapter_config.json", b"{}")) + zeros_16m() * (total // (16 * MiB))


class CountingReader(io.RawIOBase):
    """A compressed archive whose reads are counted: a bomb must be stopped near its start."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.data[self.pos : self.pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` with its kind and contents: equal snapshots mean nothing was
    written, replaced or left behind."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_file():
            state[key] = ("file", path.read_bytes(), path.stat().st_mode)
        else:
            state[key] = ("dir",)
    return state


@pytest.fixture
def sandbox(tmp_path):
    """``deploy/model`` is the target (its parent exists); the files a hostile archive aims at sit
    around it, holding ``sentinel``."""
    (tmp_path / "deploy").mkdir()
    for name in ("etc/x", "sentinel.txt", "deploy/sentinel.txt", "outside/passwd"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"sentinel")
    return tmp_path


MALICIOUS = {
    "parent-escape-../../etc/x": (lambda s: pack(file("../../etc/x")), "../../etc/x", "points outside the target"),
    "parent-escape-hidden-in-path": (
        lambda s: pack(file("adapters/a/../../../sentinel.txt")),
        "adapters/a/../../../sentinel.txt",
        "points outside the target",
    ),
    "absolute-path": (lambda s: pack(file("/abs/path")), "/abs/path", "is an absolute path"),
    "absolute-path-to-sentinel": (
        lambda s: pack(file(str(s / "sentinel.txt"))),
        lambda s: str(s / "sentinel.txt"),
        "is an absolute path",
    ),
    "symlink-to-etc-passwd": (lambda s: pack(link("passwd", "/etc/passwd")), "passwd", "is a symbolic link"),
    "symlink-then-write-through-it": (
        lambda s: pack(link("escape", str(s / "outside")), file("escape/passwd", b"owned")),
        "escape",
        "is a symbolic link",
    ),
    "symlink-chain-escaping": (
        lambda s: pack(link("inner", "."), link("outer", "inner/../.."), file("outer/sentinel.txt", b"owned")),
        "inner",
        "is a symbolic link",
    ),
    "hardlink-outside": (
        lambda s: pack(link("weights.bin", "../sentinel.txt", tarfile.LNKTYPE)),
        "weights.bin",
        "is a hard link",
    ),
    "hardlink-to-absolute-sentinel": (
        lambda s: pack(link("weights.bin", str(s / "sentinel.txt"), tarfile.LNKTYPE)),
        "weights.bin",
        "is a hard link",
    ),
    "character-device-node": (
        lambda s: pack((_info("dev-null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)),
        "dev-null",
        "is a device node",
    ),
    "block-device-node": (
        lambda s: pack((_info("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), None)),
        "disk",
        "is a device node",
    ),
    "fifo": (lambda s: pack((_info("pipe", tarfile.FIFOTYPE), None)), "pipe", "is a FIFO"),
    "duplicate-member-overwrites": (
        lambda s: pack(file("adapter_config.json", b"{}"), file("adapter_config.json", b'{"evil": 1}')),
        "adapter_config.json",
        "appears twice",
    ),
    "duplicate-member-via-dot-slash": (
        lambda s: pack(file("config.json", b"{}"), file("./config.json", b"{}")),
        "./config.json",
        "appears twice",
    ),
    "member-then-symlink-of-same-name": (
        lambda s: pack(file("tokenizer.json", b"{}"), link("tokenizer.json", "/etc/passwd")),
        "tokenizer.json",
        "appears twice",
    ),
    "file-then-member-inside-it": (
        lambda s: pack(file("adapters", b"x"), file("adapters/a/adapter_config.json", b"{}")),
        "adapters/a/adapter_config.json",
        "which the archive holds as a file",
    ),
    "member-named-dot": (lambda s: pack(file("./", b"x")), "./", "names the target folder itself"),
}


@pytest.mark.parametrize("case", list(MALICIOUS), ids=list(MALICIOUS))
def test_a_hostile_member_is_refused_and_nothing_is_written(case, sandbox):
    build, member, problem = MALICIOUS[case]
    member = member(sandbox) if callable(member) else member
    data = build(sandbox)
    target = sandbox / "deploy" / "model"
    before = snapshot(sandbox)
    with pytest.raises(ArchiveError) as refused:
        safe_extract(data, target, name=ARCHIVE, **LIMITS)
    message = str(refused.value)
    assert refused.value.member == member, message
    assert message.startswith(f"{ARCHIVE}: member {member!r} ") and problem in message
    assert f"nothing was extracted into {target}" in message
    assert snapshot(sandbox) == before, "the archive wrote, replaced or left something"


def test_ten_thousand_tiny_members_are_refused_under_the_default_limits(sandbox):
    data = pack(*(file(f"shard-{i:05d}.txt", b"x") for i in range(10_000)))
    before = snapshot(sandbox)
    with pytest.raises(ArchiveError, match=r"member 'shard-04096.txt' is member number 4097: over the limit of 4096"):
        safe_extract(data, sandbox / "deploy" / "model", name=ARCHIVE, **model_archive_limits())
    assert snapshot(sandbox) == before


def test_the_limits_can_be_tightened_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("LLMOPS_MAX_MODEL_BYTES", str(5 * MiB))
    monkeypatch.setenv("LLMOPS_MAX_MODEL_MEMBERS", "12")
    assert model_archive_limits() == {"max_bytes": 5 * MiB, "max_members": 12}
    monkeypatch.setenv("LLMOPS_MAX_MODEL_MEMBERS", "many")
    with pytest.raises(ValueError, match="LLMOPS_MAX_MODEL_MEMBERS='many' is not a whole number"):
        model_archive_limits()


BOMBS = {
    # One member whose header declares 4 GiB: refused at the header, before any of it is inflated.
    "gzip-bomb-one-4gib-member": (bomb_one_member, "model.safetensors", "over the limit of 67,108,864"),
    # 4 GiB in 16 MiB members: refused at the member that passes the limit.
    "gzip-bomb-4gib-in-16mib-members": (bomb_many_members, "shard-0004.bin", "over the limit of 67,108,864"),
    # 4 GiB of zeros after a complete archive: refused after a megabyte of "padding".
    "gzip-bomb-4gib-after-the-end-marker": (bomb_after_end, None, "padding after the end of the archive"),
}


@pytest.mark.parametrize("case", list(BOMBS), ids=list(BOMBS))
def test_a_gzip_bomb_is_stopped_early(case, sandbox, ledger):
    build, member, problem = BOMBS[case]
    data = build(4 * GiB)
    reader = CountingReader(data)
    before = snapshot(sandbox)
    started = time.perf_counter()
    with pytest.raises(ArchiveError) as refused:
        safe_extract(io.BufferedReader(reader), sandbox / "deploy" / "model", name=ARCHIVE, **LIMITS)
    elapsed = time.perf_counter() - started
    assert refused.value.member == member and problem in str(refused.value), str(refused.value)
    share = reader.pos / len(data)
    ledger.figure("compressed_read_pct", 100 * share)
    ledger.figure("seconds", elapsed)
    assert share < 0.05, f"read {reader.pos:,} of {len(data):,} compressed bytes before stopping"
    assert snapshot(sandbox) == before


def test_an_oversized_pax_header_is_refused_without_reading_it(sandbox):
    huge = _info("adapter_config.json", pax_headers={"comment": "x" * (8 * MiB)})
    before = snapshot(sandbox)
    with pytest.raises(ArchiveError, match="decompresses to more data than its members account for"):
        safe_extract(pack((huge, b"{}")), sandbox / "deploy" / "model", name=ARCHIVE, **LIMITS)
    assert snapshot(sandbox) == before


GOOD = pack(file("adapter_config.json", b"{}"), file("adapter_model.safetensors", b"w" * 300_000))

BROKEN = {
    "truncated-gzip": (lambda: GOOD[: len(GOOD) * 2 // 3], "is truncated"),
    "gzip-without-its-last-bytes": (lambda: GOOD[:-4], "is truncated"),
    "corrupt-gzip-bytes": (
        lambda: GOOD[:200] + bytes(b ^ 0x5A for b in GOOD[200:260]) + GOOD[260:],
        "is corrupt|is not a valid",
    ),
    "not-gzip-at-all": (lambda: raw_tar(file("config.json", b"{}")), "is not a valid gzip stream"),
    "tar-without-end-marker": (
        lambda: gzip.compress(raw_tar(file("config.json", b"{}"), end=False)),
        "ends before the tar end-of-archive marker",
    ),
    "tar-cut-inside-a-header": (
        lambda: gzip.compress(raw_tar(file("config.json", b"{}"), end=False) + b"x" * 100),
        "ends before the tar end-of-archive marker",
    ),
    "corrupt-tar-header-after-first-member": (
        lambda: gzip.compress(raw_tar(file("config.json", b"{}"), end=False) + b"\x01" * 512 + b"\0" * 1024),
        "corrupt tar header",
    ),
    "empty-file": (lambda: b"", "ends before the tar end-of-archive marker"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_a_corrupt_or_truncated_archive_is_refused_and_leaves_nothing(case, sandbox):
    build, problem = BROKEN[case]
    before = snapshot(sandbox)
    with pytest.raises(ArchiveError) as refused:
        safe_extract(build(), sandbox / "deploy" / "model", name=ARCHIVE, **LIMITS)
    assert str(refused.value).startswith(ARCHIVE) and re.search(problem, str(refused.value)), str(refused.value)
    assert snapshot(sandbox) == before, "a failed extraction left files behind"


def test_a_refused_archive_leaves_a_previous_model_in_place(sandbox):
    target = sandbox / "deploy" / "model"
    safe_extract(GOOD, target, name=ARCHIVE, **LIMITS)
    before = snapshot(sandbox)
    with pytest.raises(ArchiveError):
        safe_extract(pack(file("../../etc/x")), target, replace=True, name=ARCHIVE, **LIMITS)
    assert snapshot(sandbox) == before
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        safe_extract(GOOD, target, name=ARCHIVE, **LIMITS)


def test_the_partial_folder_of_a_killed_extraction_is_never_loaded_and_is_cleaned_up(sandbox):
    """A process killed mid-extraction leaves only a hidden ``.model.partial-<pid>-*`` folder; the
    target never exists half-written, and the next extraction removes the leftover."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = sandbox / "deploy" / f".model.partial-{dead.stdout.strip()}-abc"
    (stale / "adapters").mkdir(parents=True)
    target = safe_extract(GOOD, sandbox / "deploy" / "model", name=ARCHIVE, **LIMITS)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not stale.exists()
    assert [p.name for p in (sandbox / "deploy").iterdir() if p.name.startswith(".")] == []


@pytest.mark.reliability("idempotency")
def test_model_servers_starting_together_share_one_complete_unpacked_folder(tmp_path):
    """Two variants of one model start at once (or a server restarts while another runs): each
    gets the same complete folder, none sees a half-written one, and nothing else is left."""
    from concurrent.futures import ThreadPoolExecutor

    from serving.model import _unpack

    payload = b"w" * (4 * MiB)
    (tmp_path / "model.tar.gz").write_bytes(pack(file("adapter_config.json", b"{}"), file("weights.bin", payload)))
    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: _unpack(tmp_path), range(8)))
    assert len(set(roots)) == 1
    assert (roots[0] / "weights.bin").read_bytes() == payload
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.tar.gz", roots[0].name])


def test_read_member_refuses_a_hostile_archive_and_an_oversized_member():
    assert read_member(GOOD, "adapter_config.json", **LIMITS) == b"{}"
    assert read_member(GOOD, "metrics.json", **LIMITS) is None
    with pytest.raises(ArchiveError, match="member 'evil' is a symbolic link"):
        read_member(pack(link("evil", "/etc/passwd"), file("metrics.json", b"{}")), "metrics.json", **LIMITS)
    with pytest.raises(ArchiveError, match="member 'metrics.json' is 2,000,000 bytes: over the 1,000,000"):
        read_member(pack(file("metrics.json", b"0" * 2_000_000)), "metrics.json", max_member_bytes=1_000_000, **LIMITS)


# -- every extraction site goes through safe_extract -----------------------------------------------

TRAVERSAL = pack(file("adapter_config.json", b"{}"), file("../../etc/x", b"owned"))


def _serving(sandbox: Path) -> None:
    from serving.model import load

    model_dir = sandbox / "deploy" / "model"
    model_dir.mkdir()
    (model_dir / "model.tar.gz").write_bytes(TRAVERSAL)
    try:
        load(model_dir)
    finally:
        left = sorted(p.name for p in model_dir.iterdir())
        assert left == ["model.tar.gz"], f"a later start would find a half-unpacked model: {left}"


def _evaluation(sandbox: Path) -> None:
    from training.evaluate import _unpack

    (sandbox / "model.tar.gz").write_bytes(TRAVERSAL)
    _unpack(sandbox / "model.tar.gz", sandbox / "deploy" / "candidate")


def _local_backend(sandbox: Path) -> None:
    from llmops.artifacts import extract_model

    extract_model(TRAVERSAL, sandbox / "deploy" / "model")


def _sagemaker_metrics(sandbox: Path) -> None:
    from llmops import storage
    from llmops.backends.training.sagemaker import archive_metrics

    (sandbox / "model.tar.gz").write_bytes(TRAVERSAL)
    archive_metrics(storage.to_uri(str(sandbox / "model.tar.gz")))


SITES = {
    "model-server-load": (_serving, "ModelLoadError"),
    "evaluation-job-unpack": (_evaluation, "ArchiveError"),
    "local-backend-extract-model": (_local_backend, "ArchiveError"),
    "sagemaker-archive-metrics": (_sagemaker_metrics, "ArchiveError"),
}


@pytest.mark.parametrize("site", list(SITES), ids=list(SITES))
def test_every_extraction_site_refuses_a_path_traversal(site, sandbox):
    run, error = SITES[site]
    with pytest.raises(Exception) as refused:
        run(sandbox)
    assert type(refused.value).__name__ == error
    assert "member '../../etc/x' points outside the target folder" in str(refused.value)
    assert (sandbox / "etc" / "x").read_bytes() == b"sentinel"
    assert not any(p.name.startswith(".") for p in (sandbox / "deploy").rglob("*")), "a partial folder was left"


# -- our own archives still unpack and serve -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, base_model_dir) -> Path:
    from tests.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-base"), base_model_dir)


def save_adapter(base: Path, folder: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    (folder / "training_config.json").write_text(json.dumps({"base_model": str(base)}))
    (folder / "metrics.json").write_text(json.dumps({"final": {"eval_loss": 1.5}, "history": []}))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base) -> Path:
    """A model folder as training writes it: an adapter at the top, a second in ``adapters/``."""
    root = tmp_path_factory.mktemp("trained")
    save_adapter(tiny_base, root, seed=1)
    save_adapter(tiny_base, root / "adapters" / "other", seed=2)
    return root


def local_backend_tarball(folder: Path) -> bytes:
    from llmops.backends.training.local import _tarball

    return _tarball(folder)


def sagemaker_style_tarball(folder: Path) -> bytes:
    """As SageMaker packs ``/opt/ml/model`` (``tar -czf model.tar.gz -C /opt/ml/model .``): a ``./``
    root, folder entries, ``./``-prefixed names."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        tar.add(folder, arcname=".")
    return buffer.getvalue()


PACKERS = {"local-backend-packer": local_backend_tarball, "sagemaker-style-tar-C-dot": sagemaker_style_tarball}


@pytest.mark.parametrize("packer", list(PACKERS), ids=list(PACKERS))
def test_our_own_model_archive_unpacks_and_serves(packer, trained, tmp_path, allowed):
    from llmops import storage
    from llmops.backends.training.sagemaker import archive_metrics
    from serving.model import load

    data = PACKERS[packer](trained)
    model_dir = tmp_path / "opt-ml-model"
    model_dir.mkdir()
    (model_dir / "model.tar.gz").write_bytes(data)
    assert archive_metrics(storage.to_uri(str(model_dir / "model.tar.gz"))) == {"eval_loss": 1.5}
    loaded = load(model_dir)
    assert loaded.adapters == ("default", "other")
    [unpacked] = [p for p in model_dir.iterdir() if p.name != "model.tar.gz"]
    expected = sorted(str(p.relative_to(trained)) for p in trained.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if p.is_file()) == expected
    one = loaded.generate("hi", 3, adapter="other")
    assert one["adapter"] == "other" and one["completion_tokens"] <= 3
    # A restart reuses the complete folder; a replaced tarball gets a folder of its own.
    inode = (unpacked / "adapter_config.json").stat().st_ino
    assert load(model_dir).generate("hi", 3, adapter="other")["generated_text"] == one["generated_text"]
    assert (unpacked / "adapter_config.json").stat().st_ino == inode
    os.utime(model_dir / "model.tar.gz", ns=(1, 1))
    assert load(model_dir).adapters == ("default", "other")
    assert len([p for p in model_dir.iterdir() if p.name.startswith("unpacked-")]) == 2


def test_a_request_for_an_unknown_adapter_is_refused_with_the_known_ones(trained, allowed):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.model import load

    loaded = load(trained)
    with pytest.raises(ValueError, match=r"unknown adapter '\.\./other' \(known: default, other\)"):
        loaded.prepare("hi", 2, adapter="../other")
    with TestClient(create_app(loader=lambda: loaded)) as client:
        response = client.post("/invocations", json={"inputs": "hi", "adapter": "nope"})
    assert response.status_code == 404
    assert response.json() == {"error": "unknown adapter 'nope' (known: default, other)"}


# -- what the model server loads ------------------------------------------------------------------


@pytest.fixture
def allowed(monkeypatch, tiny_base) -> Path:
    """The tiny base model's parent is the one allowed base-model folder; no LLMOPS_BASE_MODEL."""
    monkeypatch.setenv("LLMOPS_BASE_MODEL_ROOTS", str(tiny_base.parent))
    monkeypatch.delenv("LLMOPS_BASE_MODEL", raising=False)
    return tiny_base.parent


def copy_model(trained: Path, into: Path) -> Path:
    return Path(shutil.copytree(trained, into))


def test_a_symlinked_adapter_folder_is_refused(trained, tmp_path, allowed):
    from serving.model import ModelLoadError, load

    root = copy_model(trained, tmp_path / "model")
    outside = copy_model(trained / "adapters" / "other", tmp_path / "elsewhere")
    (root / "adapters" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelLoadError, match=r"adapter 'linked': .*adapters/linked is a link or not a folder inside"):
        load(root)


def test_a_symlinked_adapters_folder_is_refused(trained, tmp_path, allowed):
    from serving.model import ModelLoadError, load

    root = copy_model(trained, tmp_path / "model")
    shutil.rmtree(root / "adapters")
    (root / "adapters").symlink_to(trained / "adapters", target_is_directory=True)
    with pytest.raises(ModelLoadError, match=r"/adapters is a symbolic link to .*/adapters, outside the model folder"):
        load(root)


def test_a_weights_file_linked_outside_the_model_folder_is_refused(trained, tmp_path, allowed):
    from serving.model import ModelLoadError, load

    root = copy_model(trained, tmp_path / "model")
    weights = root / "adapters" / "other" / "adapter_model.safetensors"
    outside = tmp_path / "outside.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    with pytest.raises(ModelLoadError, match=r"adapter_model.safetensors is a symbolic link to .*outside the model"):
        load(root)


BAD_NAMES = {"dotted-name": "v1.2", "leading-dash": "-rm", "space-in-name": "a b", "65-characters": "a" * 65}


@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_an_adapter_with_an_unsafe_name_is_refused(name, trained, tmp_path, allowed):
    from serving.model import ModelLoadError, load

    root = copy_model(trained, tmp_path / "model")
    (root / "adapters" / "other").rename(root / "adapters" / name)
    with pytest.raises(ModelLoadError, match=re.escape(f"{name!r} is not a valid adapter name")):
        load(root)


def _with_base(trained: Path, into: Path, base: str) -> Path:
    root = copy_model(trained, into)
    for config in (root / "training_config.json", root / "adapters" / "other" / "training_config.json"):
        config.write_text(json.dumps({"base_model": base}))
    return root


BASES = {
    "hub-id": ("HuggingFaceTB/SmolLM2-135M-Instruct", "looks like a Hugging Face Hub id"),
    "relative-escape": ("../../../../etc", "is not a model folder (with a config.json) under the allowed"),
    "absolute-folder-outside-the-roots": (None, "is a model folder outside the allowed base-model folders"),
}


@pytest.mark.parametrize("case", list(BASES), ids=list(BASES))
def test_a_base_model_outside_the_allowed_folders_is_refused(case, trained, tiny_base, tmp_path, monkeypatch):
    from serving.model import ModelLoadError, load

    base, problem = BASES[case]
    allowed = tmp_path / "models"
    allowed.mkdir()
    monkeypatch.setenv("LLMOPS_BASE_MODEL_ROOTS", str(allowed))
    monkeypatch.delenv("LLMOPS_BASE_MODEL", raising=False)
    root = _with_base(trained, tmp_path / "model", base or str(tiny_base))
    with pytest.raises(ModelLoadError) as refused:
        load(root)
    message = str(refused.value)
    assert problem in message and f"{root / 'training_config.json'}" in message and str(allowed) in message, message


def test_a_base_model_under_an_allowed_folder_loads_by_path_or_by_name(trained, tiny_base, tmp_path, allowed):
    from serving.model import load

    by_path = load(_with_base(trained, tmp_path / "by-path", str(tiny_base)))
    by_name = load(_with_base(trained, tmp_path / "by-name", tiny_base.name))
    assert by_path.generate("hi", 4)["generated_text"] == by_name.generate("hi", 4)["generated_text"]


def test_llmops_base_model_wins_over_what_the_adapter_names(trained, tiny_base, tmp_path, monkeypatch):
    from serving.model import ModelLoadError, load

    monkeypatch.setenv("LLMOPS_BASE_MODEL_ROOTS", str(tmp_path / "nowhere"))
    root = _with_base(trained, tmp_path / "model", "HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setenv("LLMOPS_BASE_MODEL", str(tiny_base))
    assert load(root).adapters == ("default", "other")
    monkeypatch.setenv("LLMOPS_BASE_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ModelLoadError, match="is not a model folder with a config.json"):
        load(root)


def test_adapters_naming_different_base_models_are_refused(trained, tiny_base, tmp_path, monkeypatch):
    from serving.model import ModelLoadError, load

    other_base = Path(shutil.copytree(tiny_base, tmp_path / "models" / "other-base"))
    monkeypatch.setenv("LLMOPS_BASE_MODEL_ROOTS", os.pathsep.join([str(tiny_base.parent), str(other_base.parent)]))
    monkeypatch.delenv("LLMOPS_BASE_MODEL", raising=False)
    root = copy_model(trained, tmp_path / "model")
    (root / "adapters" / "other" / "training_config.json").write_text(json.dumps({"base_model": str(other_base)}))
    with pytest.raises(ModelLoadError, match="name different base models"):
        load(root)
