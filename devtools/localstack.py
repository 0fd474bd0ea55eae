"""The embedded stack: Airflow 3 and MLflow on this machine, all state under ``$LLMOPS_HOME``.

One place defines the environment every local entry point shares (the demo, the tests and
``make up``), so they cannot drift apart.

The endpoint gateway ``make up`` starts requires an API key, and a key carries a role. Two keys
are made once per state folder (mode 0600 under ``$LLMOPS_HOME/secrets/``):

- ``gateway_api_key``, role ``admin``: the gateway and the Airflow processes get it as
  ``LLMOPS_GATEWAY_API_KEY`` (the rollout creates models and endpoint configs); an Airflow
  connection ``llmops_gateway`` (the key as its password) takes precedence where it is defined;
- ``gateway_invoke_key``, role ``invoke``: the key of the callers (``python -m devtools.traffic``,
  a notebook, curl), listed in the gateway's keys file (``gateway_api_keys``, as a digest) as the
  client ``local``; it calls models and nothing else.

``apply_environment`` puts both into the processes that talk to the gateway from here (the demo,
``python -m devtools.traffic``): ``LLMOPS_GATEWAY_API_KEY`` and ``LLMOPS_GATEWAY_INVOKE_KEY``.

    python -m devtools.localstack up       # api-server, scheduler, dag-processor, triggerer, MLflow, gateway
    python -m devtools.localstack down
    python -m devtools.localstack env      # print the environment as shell exports
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from llmops.backends.endpoints.credentials import GATEWAY_KEY_ENV
from llmops.config import PROJECT_ROOT, ConfigError, default_home, load_settings

AIRFLOW_PORT = int(os.environ.get("LLMOPS_AIRFLOW_PORT", "8080"))
MLFLOW_PORT = int(os.environ.get("LLMOPS_MLFLOW_PORT", "5000"))
GATEWAY_PORT = int(os.environ.get("LLMOPS_GATEWAY_PORT", "8090"))
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
COMPONENTS = (*AIRFLOW_COMPONENTS, "mlflow", "gateway")
GATEWAY_KEY_FILE = "gateway_api_key"
GATEWAY_INVOKE_KEY_FILE = "gateway_invoke_key"
GATEWAY_KEYS_FILE = "gateway_api_keys"
INVOKE_KEY_ENV = "LLMOPS_GATEWAY_INVOKE_KEY"


def _private_file(path: Path, text: str) -> None:
    """Write ``text`` under a private name created 0600 (never readable by others, not even for a
    moment), then rename it over ``path``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    partial.replace(path)


def _secret(home: Path, name: str) -> str:
    """A per-installation secret kept in the state folder: every Airflow process must share the
    JWT secret, or tasks cannot talk to the API server."""
    path = home / "secrets" / name
    if not path.is_file() or len(path.read_text().strip()) < 64:
        _private_file(path, secrets.token_urlsafe(64))
    return path.read_text().strip()


def gateway_api_key(home: str | os.PathLike[str], create: bool = False) -> str | None:
    """The API key of the gateway ``make up`` runs for this state folder (made when ``create``)."""
    home = Path(home)
    if create:
        return _secret(home, GATEWAY_KEY_FILE)
    path = home / "secrets" / GATEWAY_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


AIRFLOW_USERS = {"admin": "admin", "operator": "op", "viewer": "viewer"}  # user -> Airflow's simple role
AIRFLOW_PASSWORDS_FILE = "airflow_passwords.json"


def write_airflow_passwords(path: Path, passwords: dict[str, str]) -> None:
    """The simple auth manager's passwords file (``AIRFLOW_USERS``' users), private to its owner."""
    missing = sorted(set(AIRFLOW_USERS) - set(passwords))
    weak = sorted(user for user, password in passwords.items() if len(password) < 12)
    if missing or weak:
        raise ConfigError(f"Airflow passwords: missing for {missing}, shorter than 12 characters for {weak}")
    _private_file(path, json.dumps({user: passwords[user] for user in AIRFLOW_USERS}) + "\n")


def airflow_passwords(home: Path) -> Path:
    """The passwords of the stack's Airflow users (admin, operator, viewer), made once per state
    folder: ``make up`` has no all-admins mode, every visitor logs in."""
    path = home / "secrets" / AIRFLOW_PASSWORDS_FILE
    if not path.is_file():
        write_airflow_passwords(path, {user: secrets.token_urlsafe(18) for user in AIRFLOW_USERS})
    return path


def gateway_invoke_key(home: str | os.PathLike[str], create: bool = False) -> str | None:
    """The ``invoke`` key of the gateway ``make up`` runs (made when ``create``): callers' key."""
    home = Path(home)
    if create:
        return _secret(home, GATEWAY_INVOKE_KEY_FILE)
    path = home / "secrets" / GATEWAY_INVOKE_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


def gateway_keys_file(home: Path) -> Path:
    """The gateway's keys file: the callers' ``invoke`` key, as its digest (the admin key comes as
    ``LLMOPS_GATEWAY_API_KEY``, the client ``default``)."""
    digest = hashlib.sha256(gateway_invoke_key(home, create=True).encode()).hexdigest()
    path = home / "secrets" / GATEWAY_KEYS_FILE
    _private_file(
        path,
        f"# made by make up: the key in {GATEWAY_INVOKE_KEY_FILE} calls models and nothing else\n"
        f"local sha256:{digest} invoke\n",
    )
    return path


def capture_roots(home: Path) -> list[str]:
    """Where the gateway may write captured traffic: the settings' capture destination."""
    try:
        destination = load_settings().serving.capture_uri
    except ConfigError as exc:
        print(f"gateway: capture root {home / 'capture'} (the settings did not load: {exc})", file=sys.stderr)
        return [str(home / "capture")]
    return [destination] if not destination.startswith("s3://") else [str(home / "capture")]


def model_store(home: Path) -> list[str]:
    """Where the gateway may load models from: the settings' store (training jobs write model
    tarballs under it), else the state folder's ``store``."""

    try:
        return [load_settings().store_uri]
    except ConfigError as exc:
        print(f"gateway: model store {home / 'store'} (the settings did not load: {exc})", file=sys.stderr)
        return [str(home / "store")]


def environment(home: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Environment variables of the embedded stack. Values already set by the user win for the
    database connection and the MLflow URI, so the same commands can run against Postgres."""
    home = Path(home or default_home()).resolve()
    airflow_home = home / "airflow"
    env = {
        "LLMOPS_HOME": str(home),
        "LLMOPS_ENV": os.environ.get("LLMOPS_ENV", "local"),
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "plugins"), str(PROJECT_ROOT)]),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # 32 worker processes by default cost about 5 GB here; a laptop needs a few.
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
        # Users with roles, passwords in a private file (airflow_passwords): no all-admins mode.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in AIRFLOW_USERS.items()),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_passwords(home)),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(home, "jwt_secret"),
        "AIRFLOW__API__SECRET_KEY": _secret(home, "api_secret_key"),
        "AIRFLOW__API__PORT": str(AIRFLOW_PORT),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{AIRFLOW_PORT}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(airflow_home / "logs"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": os.environ.get(
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{airflow_home / 'airflow.db'}"
        ),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"),
        "HF_HOME": str(home / "cache" / "huggingface"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        # Temporary files (GX's throw-away context, pytest's tmp_path) stay in the state folder too.
        "TMPDIR": str(home / "tmp"),
    }
    return env


def apply_environment(home: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Put the stack's environment into this process (before Airflow is imported), with the
    gateway's API key when ``make up`` made one and none is set already."""
    env = environment(home)
    os.environ.update(env)
    if not os.environ.get(GATEWAY_KEY_ENV):
        key = gateway_api_key(env["LLMOPS_HOME"])
        if key:
            os.environ[GATEWAY_KEY_ENV] = key
    if not os.environ.get(INVOKE_KEY_ENV):
        key = gateway_invoke_key(env["LLMOPS_HOME"])
        if key:
            os.environ[INVOKE_KEY_ENV] = key
    for path in reversed(env["PYTHONPATH"].split(os.pathsep)):
        if path not in sys.path:
            sys.path.insert(0, path)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = None  # forget a temporary folder chosen before TMPDIR was set
    return env


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def migrate_db(env: dict[str, str]) -> None:
    subprocess.run([_bin("airflow"), "db", "migrate"], env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)


def _pid_dir(env: dict[str, str]) -> Path:
    path = Path(env["LLMOPS_HOME"]) / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # nosec B310 - our own http://127.0.0.1 URLs
                if response.status < 500:
                    return True
        except OSError:
            time.sleep(2)
    return False


def up(timeout: float = 180, components: tuple[str, ...] = COMPONENTS) -> int:
    """Start ``components`` (those not already running) in the background and wait until they answer."""
    env = apply_environment()
    if set(components) & set(AIRFLOW_COMPONENTS):
        migrate_db(env)
    home = Path(env["LLMOPS_HOME"])
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    commands = {c: [_bin("airflow"), c] for c in AIRFLOW_COMPONENTS}
    commands["api-server"] += ["--port", str(AIRFLOW_PORT)]
    commands["mlflow"] = [
        _bin("mlflow"),
        "server",
        "--backend-store-uri",
        env["MLFLOW_TRACKING_URI"],
        "--default-artifact-root",
        (home / "mlflow" / "artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(MLFLOW_PORT),
        "--workers",
        "1",
    ]
    commands["gateway"] = [
        sys.executable,
        "-m",
        "serving.gateway",
        "--port",
        str(GATEWAY_PORT),
        "--state-dir",
        str(home / "gateway"),
        *(arg for root in model_store(home) for arg in ("--model-store", root)),
        *(arg for root in capture_roots(home) for arg in ("--capture-root", root)),
        "--api-keys-file",
        str(gateway_keys_file(home)),
        "--require-auth",
    ]
    # The user's own key wins; else the state folder's. Tasks find it here unless the Airflow
    # connection llmops_gateway says otherwise; MLflow has no use for it.
    if not os.environ.get(GATEWAY_KEY_ENV):
        os.environ[GATEWAY_KEY_ENV] = gateway_api_key(home, create=True)
    keyed = {*AIRFLOW_COMPONENTS, "gateway"}
    for name, command in commands.items():
        if name not in components:
            continue
        pid_file = _pid_dir(env) / f"{name}.pid"
        if pid_file.is_file() and _alive(int(pid_file.read_text())):
            print(f"{name}: already running (pid {pid_file.read_text().strip()})")
            continue
        child_env = {**os.environ, **env}
        child_env.pop(INVOKE_KEY_ENV, None)  # the callers' key: no service of the stack needs it
        if name not in keyed:
            child_env.pop(GATEWAY_KEY_ENV, None)
        with open(logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command,
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=PROJECT_ROOT,
            )
        pid_file.write_text(str(process.pid))
        print(f"{name}: started (pid {process.pid}, log {logs / (name + '.log')})")
    checks = {
        "Airflow UI": (f"http://localhost:{AIRFLOW_PORT}/api/v2/monitor/health", f"http://localhost:{AIRFLOW_PORT}"),
        "MLflow UI": (f"http://127.0.0.1:{MLFLOW_PORT}/health", f"http://localhost:{MLFLOW_PORT}"),
        "Endpoint gateway": (f"http://127.0.0.1:{GATEWAY_PORT}/ping", f"http://127.0.0.1:{GATEWAY_PORT}"),
    }
    owner = {"Airflow UI": "api-server", "MLflow UI": "mlflow", "Endpoint gateway": "gateway"}
    ok = True
    for label, (health, url) in checks.items():
        if owner[label] not in components:
            continue
        if _wait_http(health, timeout):
            print(f"{label}: {url}")
        else:
            ok = False
            print(f"{label}: not answering at {health} after {timeout:.0f}s; see {logs}", file=sys.stderr)
    return 0 if ok else 1


def down(timeout: float = 30) -> int:
    env = environment()
    for pid_file in sorted(_pid_dir(env).glob("*.pid")):
        pid = int(pid_file.read_text())
        if _alive(pid):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)
            print(f"{pid_file.stem}: stopped")
        pid_file.unlink()
    return 0


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "up":
        return up()
    if command == "down":
        return down()
    if command == "env":
        for key, value in environment().items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
