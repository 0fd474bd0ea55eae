"""A real Airflow stack for end-to-end tests: api-server, scheduler and dag-processor as separate
processes on a PostgreSQL database of their own, driven over the REST API like a user would.

PostgreSQL is required, not optional: when it cannot be reached the test fails and says so."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import yaml

from devtools.localstack import environment
from llmops.config import INCLUDE_DIR, PROJECT_ROOT
from tests.gateways import free_port

PG_HOST = os.environ.get("LLMOPS_E2E_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LLMOPS_E2E_PG_PORT", "5432"))
PG_ROLES = ("postgres", "root")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "gateway")
LOG_TAIL = 80
STOP_TIMEOUT = 20


def _admin_connection():
    """An autocommit connection to the ``postgres`` database, as the first role that works."""
    import psycopg2

    errors = []
    for role in PG_ROLES:
        try:
            connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=role, dbname="postgres", connect_timeout=5)
        except psycopg2.OperationalError as exc:
            errors.append(f"{role}: {str(exc).strip()}")
            continue
        connection.autocommit = True
        return connection, role
    pytest.fail(
        f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} with any of the roles {list(PG_ROLES)}; "
        "the end-to-end tests need it (start PostgreSQL with trust auth on 127.0.0.1:5432).\n  " + "\n  ".join(errors),
        pytrace=False,
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database for this session, dropped afterwards."""
    connection, role = _admin_connection()
    name = f"llmops_e2e_{secrets.token_hex(6)}"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    try:
        yield f"postgresql+psycopg2://{role}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        connection, _ = _admin_connection()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.close()


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text[-lines:])


class AirflowStack:
    """The running processes, their logs, and an authenticated REST client."""

    def __init__(self, home: Path, env: dict[str, str], port: int) -> None:
        self.home = home
        self.env = env
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.logs = home / "logs"
        self.processes: dict[str, subprocess.Popen] = {}
        self.http = requests.Session()

    # processes ------------------------------------------------------------------------------

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        airflow = str(Path(sys.executable).parent / "airflow")
        commands = {name: [airflow, name] for name in COMPONENTS if name != "gateway"}
        commands["api-server"] += ["--port", str(self.port)]
        gateway_port = self.env["LLMOPS_GATEWAY_URL"].rsplit(":", 1)[1]
        commands["gateway"] = [
            sys.executable,
            "-m",
            "serving.gateway",
            "--port",
            gateway_port,
            "--state-dir",
            str(self.home / "gateway"),
        ]
        for name, command in commands.items():
            with open(self.logs / f"{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(
                    command,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=PROJECT_ROOT,
                )

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in self.processes.values():
            # The group, not only the leader: the scheduler's executor workers and task
            # supervisors live in it too, and may outlive a leader that has already exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
        if dead:
            pytest.fail(f"Airflow component(s) exited: {dead}\n{self.diagnostics()}", pytrace=False)

    # diagnostics ----------------------------------------------------------------------------

    def diagnostics(self, dag_id: str | None = None, run_id: str | None = None) -> str:
        parts = []
        for name in COMPONENTS:
            parts.append(f"----- last {LOG_TAIL} lines of {name}.log -----\n{_tail(self.logs / f'{name}.log')}")
        if dag_id and run_id:
            parts.append(self.task_logs(dag_id, run_id))
        return "\n".join(parts)

    def task_logs(self, dag_id: str, run_id: str) -> str:
        """The log tails of this run's task instances that did not succeed."""
        try:
            instances = self.task_instances(dag_id, run_id)
        except Exception as exc:  # diagnostics must not hide the original failure
            return f"(cannot list task instances: {exc})"
        parts = [f"----- task states of {dag_id}/{run_id}: { {t['task_id']: t['state'] for t in instances} }"]
        folder = Path(self.env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]) / f"dag_id={dag_id}" / f"run_id={unquote(run_id)}"
        for ti in instances:
            if ti["state"] in ("success", "skipped"):
                continue
            for path in sorted(folder.glob(f"task_id={ti['task_id']}/**/*.log")):
                parts.append(f"----- last {LOG_TAIL} lines of {path.relative_to(folder)} -----\n{_tail(path)}")
        return "\n".join(parts)

    # REST -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, expect: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        response = self.http.request(method, f"{self.base_url}{path}", timeout=30, **kwargs)
        if response.status_code not in expect:
            pytest.fail(
                f"{method} {path} answered {response.status_code} (expected {expect}): {response.text[:2000]}\n"
                f"{self.diagnostics()}",
                pytrace=False,
            )
        return response.json() if response.content else None

    def wait_until(
        self,
        what: str,
        probe: Callable[[], Any],
        timeout: float,
        interval: float = 2.0,
        details: Callable[[], str] | None = None,
    ) -> Any:
        """Call ``probe`` until it returns something truthy; fail with the logs after ``timeout``."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                result = probe()
            except (requests.ConnectionError, requests.Timeout) as exc:
                result, last_error = None, exc
            if result:
                return result
            time.sleep(interval)
        extra = ""
        if details is not None:
            try:
                extra = details() + "\n"
            except Exception as exc:  # diagnostics must not hide the timeout
                extra = f"(cannot collect details: {exc})\n"
        pytest.fail(
            f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})\n"
            f"{extra}{self.diagnostics()}",
            pytrace=False,
        )

    def authenticate(self, user: str = "admin") -> None:
        """Log in as a user of the stack (``make up``'s users, their passwords in a private file):
        there is no all-admins mode, so a token without credentials is refused first."""
        assert self.http.get(f"{self.base_url}/auth/token", timeout=30).status_code == 403
        passwords = json.loads(Path(self.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]).read_text())
        response = self.http.post(
            f"{self.base_url}/auth/token", json={"username": user, "password": passwords[user]}, timeout=30
        )
        assert response.status_code in (200, 201), f"POST /auth/token: {response.status_code} {response.text}"
        self.http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        body = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return body["task_instances"]


def _require_async_driver() -> None:
    """Airflow 3 opens an async engine next to the sync one, with the driver derived from the URL:
    ``postgresql+psycopg2://`` becomes ``postgresql+asyncpg://``. Without asyncpg every Airflow
    command dies at import with ``No module named 'asyncpg'``; say so plainly instead."""
    import importlib.util

    if importlib.util.find_spec("asyncpg") is None:
        pytest.fail(
            "asyncpg is not installed: Airflow 3 on PostgreSQL needs it for its async engine "
            "(add asyncpg to requirements.txt, or install apache-airflow-providers-postgres)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def airflow_stack(postgres_url, tmp_path_factory) -> Iterator[AirflowStack]:
    _require_async_driver()
    home = tmp_path_factory.mktemp("e2e-home").resolve()
    port = free_port()
    (home / "mlflow").mkdir()
    (home / "tmp").mkdir()
    config = yaml.safe_load((INCLUDE_DIR / "config" / "local.yaml").read_text())
    # A short evaluation: the test is about the stack, not about the model's quality.
    config["evaluation"].update(max_test_items=6, max_new_tokens=16, bootstrap_resamples=200)
    config["serving"].update(replay_max_new_tokens=8)
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    stack_env = {
        **environment(home),
        "LLMOPS_HOME": str(home),
        "LLMOPS_CONFIG_FILE": str(home / "config.yaml"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_url,
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "AIRFLOW__API__PORT": str(port),
        "LLMOPS_GATEWAY_URL": f"http://127.0.0.1:{free_port()}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        # The scheduler serves task logs on a fixed port (8793) by default: a stack from
        # ``make up`` or a second test session would collide with it.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        # Only the runs this test triggers: no cron run on unpausing llm_finetune, and no
        # asset-triggered run (default hyperparameters, the real base model) after llm_data_prep
        # publishes; with max_active_runs=1 either would hold the test's own run back for minutes.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    }
    env = {**os.environ, **stack_env}
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    migrate = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    assert migrate.returncode == 0, f"airflow db migrate failed:\n{migrate.stdout[-5000:]}\n{migrate.stderr[-5000:]}"

    stack = AirflowStack(home, env, port)
    try:
        stack.start()

        def healthy() -> bool:
            return requests.get(f"{stack.base_url}/api/v2/monitor/health", timeout=5).status_code == 200

        stack.wait_until("the API server's health endpoint", healthy, timeout=120)
        stack.authenticate()
        yield stack
    finally:
        stack.stop()
