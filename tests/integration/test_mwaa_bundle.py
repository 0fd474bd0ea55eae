"""The MWAA bundle on the Airflow MWAA runs: a clean virtualenv with Apache Airflow 3.0.6, its
Amazon provider and ``include/mwaa/requirements.txt``, nothing else (no torch), where the bundle's
DAGs import through Airflow's DagBag with plugins.zip unpacked on the path, as on MWAA.

The requirements' ``--constraint`` names a file on GitHub, which is out of reach here; the install
takes the pins that file (``constraints-3.0.6/constraints-3.12.txt``) holds for every package these
requirements resolve to instead (``MWAA_PINS``), so numpy, pandas, boto3 and the rest are the
versions MWAA installs. The interpreter is Python 3.12, MWAA's, where one is found
(``LLMOPS_MWAA_PYTHON``, ``python3.12`` on PATH, pyenv), else this one. The virtualenv is kept in
``.llmops/venvs/`` under a hash of all of that: the first run builds it (about two minutes), the
next ones reuse it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from devtools import mwaa
from llmops.config import PROJECT_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

# From https://raw.githubusercontent.com/apache/airflow/constraints-3.0.6/constraints-3.12.txt: the
# pins of the packages Airflow 3.0.6, the Amazon provider and include/mwaa/requirements.txt resolve to.
_PINNED = """
a2wsgi==1.10.10 aiobotocore==2.24.1 aiohappyeyeballs==2.6.1 aiohttp==3.12.15 aioitertools==0.12.0
aiosignal==1.4.0 aiosqlite==0.21.0 alembic==1.16.4 annotated-types==0.7.0 anyio==4.10.0
apache-airflow-providers-amazon==9.12.0 apache-airflow-providers-common-compat==1.7.3
apache-airflow-providers-common-io==1.6.2 apache-airflow-providers-common-sql==1.27.5
apache-airflow-providers-http==5.3.3 apache-airflow-providers-smtp==2.2.0
apache-airflow-providers-sqlite==4.1.2 apache-airflow-providers-standard==1.6.0 argcomplete==3.6.2
asgiref==3.9.1 attrs==25.3.0 beautifulsoup4==4.13.4 boto3==1.39.11 botocore==1.39.11 cachetools==5.5.2
cadwyn==5.4.4 certifi==2025.8.3 cffi==1.17.1 charset-normalizer==3.4.3 click==8.2.1 cloudpickle==3.1.1
colorama==0.4.6 colorlog==6.9.0 cron-descriptor==1.4.5 croniter==6.0.0 cryptography==42.0.8 Deprecated==1.2.18
dill==0.3.1.1 dnspython==2.7.0 email_validator==2.2.0 fastapi-cli==0.0.8 fastapi-cloud-cli==0.1.5
fastapi==0.116.1 filelock==3.19.1 Flask==2.2.5 frozenlist==1.7.0 fsspec==2025.7.0 gitdb==4.0.12
GitPython==3.1.45 google-auth==2.40.3 googleapis-common-protos==1.70.0 greenlet==3.2.4 grpcio==1.65.5
gunicorn==23.0.0 h11==0.16.0 hf-xet==1.1.8 httpcore==1.0.9 httptools==0.6.4 httpx==0.28.1
huggingface-hub==0.34.4 idna==3.10 importlib_metadata==8.4.0 inflection==0.5.1 itsdangerous==2.2.0
Jinja2==3.1.6 jmespath==0.10.0 jsonpath-ng==1.7.0 jsonschema-specifications==2025.4.1 jsonschema==4.25.1
lazy-object-proxy==1.12.0 libcst==1.8.2 linkify-it-py==2.0.3 lockfile==0.12.2 lxml==5.4.0 Mako==1.3.10
markdown-it-py==4.0.0 MarkupSafe==3.0.2 marshmallow==3.26.1 mdurl==0.1.2 methodtools==0.4.7 mistune==3.1.3
more-itertools==10.7.0 msgspec==0.19.0 multidict==6.6.4 numpy==1.26.4 opentelemetry-api==1.27.0
opentelemetry-exporter-otlp-proto-common==1.27.0 opentelemetry-exporter-otlp-proto-grpc==1.27.0
opentelemetry-exporter-otlp-proto-http==1.27.0 opentelemetry-exporter-otlp==1.27.0 opentelemetry-proto==1.27.0
opentelemetry-sdk==1.27.0 opentelemetry-semantic-conventions==0.48b0 packaging==25.0 pandas==2.1.4
pathspec==0.12.1 pendulum==3.1.0 pluggy==1.6.0 portalocker==3.2.0 propcache==0.3.2 protobuf==4.25.8
psutil==7.0.0 pyarrow==18.1.0 pyasn1==0.6.1 pyasn1_modules==0.4.1 PyAthena==3.17.1 pycparser==2.22
pydantic==2.11.7 pydantic_core==2.33.2 Pygments==2.19.2 PyJWT==2.10.1 pyparsing==3.2.3 python-daemon==3.1.2
python-dateutil==2.9.0.post0 python-dotenv==1.1.1 python-multipart==0.0.20 python-slugify==8.0.4 pytz==2025.2
PyYAML==6.0.2 redshift-connector==2.1.8 referencing==0.36.2 regex==2025.7.34 requests-toolbelt==1.0.0
requests==2.32.5 retryhttp==1.3.3 rich-argparse==1.7.1 rich-toolkit==0.15.0 rich==13.9.4 rignore==0.6.4
rpds-py==0.27.0 ruamel.yaml.clib==0.2.12 ruamel.yaml==0.18.15 s3fs==2025.7.0 s3transfer==0.13.1
sagemaker_studio==1.0.21 scipy==1.16.1 scramp==1.4.6 sentry-sdk==2.35.0 setproctitle==1.3.6 setuptools==80.9.0
shellingham==1.5.4 six==1.17.0 smmap==5.0.2 sniffio==1.3.1 soupsieve==2.7 SQLAlchemy-JSONField==1.0.2
SQLAlchemy-Utils==0.41.2 SQLAlchemy==1.4.54 sqlparse==0.5.3 starlette==0.47.2 structlog==25.4.0 svcs==25.1.0
tabulate==0.9.0 tenacity==9.1.2 termcolor==3.1.0 text-unidecode==1.3 tokenizers==0.21.4 tqdm==4.67.1
typer==0.16.1 typing-inspection==0.4.1 typing_extensions==4.14.1 tzdata==2025.2 tzlocal==5.3.1
universal_pathlib==0.2.6 urllib3==2.5.0 uuid6==2025.0.1 uvicorn==0.35.0 uvloop==0.21.0 watchfiles==1.1.0
watchtower==3.4.0 websockets==15.0.1 Werkzeug==2.2.3 wirerope==1.0.0 wrapt==1.17.3 yarl==1.20.1 zipp==3.23.0
"""
MWAA_PINS = _PINNED.split()
HEAVY_MODULES = ("torch", "transformers", "sentence_transformers", "peft", "gguf", "bitsandbytes")
PLACEHOLDERS = {
    "LLMOPS_S3_BUCKET": "llmops-store-123456789012",
    "MLFLOW_TRACKING_URI": "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/llmops",
    "LLMOPS_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/llmops-sagemaker",
    "LLMOPS_EC2_INSTANCE_PROFILE": "llmops-trn1",
    "LLMOPS_EC2_SUBNET_ID": "subnet-0123456789abcdef0",
}


def mwaa_python() -> str:
    """MWAA's Python where this machine has it (a pyenv shim may name one it cannot run), else this one."""
    pattern = f"~/.pyenv/versions/{mwaa.PYTHON_VERSION}.*/bin/python{mwaa.PYTHON_VERSION}"
    for candidate in (
        os.environ.get("LLMOPS_MWAA_PYTHON"),
        *sorted(glob.glob(os.path.expanduser(pattern)), reverse=True),
        shutil.which(f"python{mwaa.PYTHON_VERSION}"),
    ):
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"], capture_output=True
        )
        if probe.returncode == 0 and probe.stdout.decode().strip() == mwaa.PYTHON_VERSION:
            return candidate
    return sys.executable


def requirements_without_constraint() -> str:
    return "".join(
        line
        for line in mwaa.REQUIREMENTS.read_text().splitlines(keepends=True)
        if not line.lstrip().startswith("--constraint")
    )


@pytest.fixture(scope="module")
def venv_python() -> Path:
    """The clean virtualenv's interpreter, built once per content of what goes into it."""
    python = mwaa_python()
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True
    )
    key = hashlib.sha256(
        json.dumps([version.stdout, mwaa.AIRFLOW_VERSION, requirements_without_constraint(), MWAA_PINS]).encode()
    ).hexdigest()[:16]
    target = PROJECT_ROOT / ".llmops" / "venvs" / f"mwaa-{mwaa.AIRFLOW_VERSION}-{key}"
    if (target / ".complete").is_file():
        return target / "bin" / "python"
    shutil.rmtree(target, ignore_errors=True)
    started = time.monotonic()
    subprocess.run([python, "-m", "venv", str(target)], check=True)
    (target / "requirements.txt").write_text(requirements_without_constraint())
    (target / "constraints.txt").write_text("\n".join(MWAA_PINS) + "\n")
    install = subprocess.run(
        [
            str(target / "bin" / "python"),
            *("-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
            f"apache-airflow=={mwaa.AIRFLOW_VERSION}",
            "apache-airflow-providers-amazon",
            *("-r", str(target / "requirements.txt"), "-c", str(target / "constraints.txt")),
        ],
        capture_output=True,
        text=True,
    )
    if install.returncode:
        pytest.fail(f"the MWAA requirements do not install:\n{install.stderr[-4000:]}")
    freeze = subprocess.run(
        [str(target / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    (target / ".complete").write_text(f"built in {time.monotonic() - started:.0f}s with {python}\n{freeze}")
    return target / "bin" / "python"


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> dict[str, Path]:
    """The bundle laid out as on MWAA: dags/ and plugins.zip unpacked into plugins/."""
    root = tmp_path_factory.mktemp("mwaa")
    bundle = mwaa.package(root / "bundle", PLACEHOLDERS)
    with zipfile.ZipFile(bundle.root / mwaa.PLUGINS_ZIP) as archive:
        archive.extractall(root / "plugins")
    return {
        "root": root,
        "dags": bundle.root / "dags",
        "plugins": root / "plugins",
        "startup": bundle.root / "startup.sh",
    }


def run_on_mwaa(venv_python: Path, unpacked: dict[str, Path], code: str) -> dict:
    """Run ``code`` in the clean virtualenv with startup.sh's environment and Airflow's folders set
    as MWAA sets them; ``code`` prints one JSON line."""
    home = unpacked["root"] / "airflow"
    overrides = {
        "LLMOPS_PROJECT_ROOT": unpacked["plugins"],
        "LLMOPS_HOME": home / "llmops",
        "AIRFLOW_HOME": home,
        "AIRFLOW__CORE__DAGS_FOLDER": unpacked["dags"],
        "AIRFLOW__CORE__PLUGINS_FOLDER": unpacked["plugins"],
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": unpacked["plugins"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    exports = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in overrides.items())
    script = (
        f"source {shlex.quote(str(unpacked['startup']))} && export {exports}"
        f" && exec {shlex.quote(str(venv_python))} -c {shlex.quote(code)}"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    done = subprocess.run(["bash", "-c", script], cwd=unpacked["root"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_requirements_install_without_torch(venv_python):
    code = (
        "import importlib.util, json, airflow;"
        f"print(json.dumps([airflow.__version__, [m for m in {HEAVY_MODULES!r} if importlib.util.find_spec(m)]]))"
    )
    version, heavy = json.loads(
        subprocess.run([str(venv_python), "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert version == mwaa.AIRFLOW_VERSION
    assert heavy == []
    check = subprocess.run([str(venv_python), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_the_library_imports_and_loads_the_aws_settings(venv_python, unpacked):
    result = run_on_mwaa(
        venv_python,
        unpacked,
        """
import importlib, json, pkgutil, sys
import llmops
failed = {}
for module in pkgutil.walk_packages(llmops.__path__, "llmops."):
    try:
        importlib.import_module(module.name)
    except Exception as exc:
        failed[module.name] = f"{type(exc).__name__}: {exc}"
from llmops.config import load_settings
from llmops.models import resolve_model
settings = load_settings()
print(json.dumps({"failed": failed, "store": settings.store_uri, "backend": settings.finetune.backend,
                  "encoder": str(resolve_model(settings.models.embedding, settings.models.cache_dir))}))
""",
    )
    assert result["failed"] == {}
    assert result["store"] == f"s3://{PLACEHOLDERS['LLMOPS_S3_BUCKET']}/llmops"
    assert result["encoder"].startswith(str(unpacked["plugins"]))


def test_airflows_plugin_loader_imports_nothing_from_plugins(venv_python, unpacked):
    result = run_on_mwaa(
        venv_python,
        unpacked,
        """
import json, sys
from airflow import plugins_manager
plugins_manager.ensure_plugins_loaded()
print(json.dumps({"errors": plugins_manager.import_errors, "plugins": [p.name for p in plugins_manager.plugins or []],
                  "shadowed": [m for m in ("mwaa", "config", "train", "app", "sagemaker") if m in sys.modules]}))
""",
    )
    assert result == {"errors": {}, "plugins": [], "shadowed": []}


def test_every_dag_imports(venv_python, unpacked):
    result = run_on_mwaa(
        venv_python,
        unpacked,
        """
import json
from airflow.models.dagbag import DagBag
bag = DagBag(include_examples=False)
print(json.dumps({"errors": {k: v[-1500:] for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids)}))
""",
    )
    assert result["errors"] == {}, "\n\n".join(result["errors"].values())
    assert result["dags"] == sorted(p.stem for p in unpacked["dags"].glob("*.py"))
