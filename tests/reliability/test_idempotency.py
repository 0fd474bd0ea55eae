"""Idempotency: clearing one task of a finished DAG run and running it again changes nothing a
user can see: no new dataset version, model version, MLflow run or metric point, endpoint config,
alias move, asset event, retraining request or captured request.

For each DAG a class finishes a run on the embedded stack (the tiny model, the short evaluation
of ``tests.dagruns``, a local endpoint gateway), then each case clears one task of that run and
runs it again in this process, as the scheduler does after "Clear" on that one task in the
Airflow UI: Airflow's own ``DAG.clear`` (``clear_task_instances``) resets the task instance and
puts the run back to running, and the run loop of ``dag.test()`` runs what became runnable, which
must be that task alone. Cases go downstream first, so each re-run reads its upstream XComs as
the first run left them. ``llm_rollout`` re-runs the tasks of its first run (version 1 deployed)
after a second run promoted version 2: clearing an old run must not take the endpoint back.

Around every re-run the case takes a snapshot and compares:

- the state folder, file by file, by content: dataset versions and manifests, training and
  evaluation jobs, baselines, drift reports, capture files (by record count too), MLflow
  artifacts. A run's own partition (``runs/<dag>/<run>/``) is where a re-run overwrites its
  outputs: files there may be rewritten (a validation result records when it ran), not added;
- MLflow's whole store, row by row: experiments, runs, params, tags, every metric point (a metric
  logged again is a second row), model versions and their tags, aliases, prompts, dataset
  inputs; timestamps aside. MLflow keeps no history of aliases: a move shows as a changed row;
- the gateway's models, endpoint configs and endpoints (the config each serves, its weights), as
  the gateway records them;
- Airflow: the asset events and DAG runs made since the class began (a retraining request is an
  ``llm_finetune`` run), and the state of every task of the runs;
- the task's XComs, equal but for the flags saying whether the work was found done (``created``,
  ``reused``, ``changed``, ``alias_moved``).

A task whose effect is an Airflow event (``SIGNALS``) may end skipped when re-run, with the same
XComs: Airflow records the event again for every try that succeeds, so skipping is the only way
not to announce twice (TriggerDagRunOperator's ``skip_when_already_exists`` does the same).

A case's ledger: expected = side-effect objects before the re-run, delivered = those still there
unchanged after it (or rewritten in place in the run's partition). Anything added (a duplicate)
or removed fails the case with the difference spelled out. The last case of each class compares
the end state with the state right after the first run, and reports ``tasks_rerun``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.dagruns import MODEL_NAME as MODEL
from tests.dagruns import fast_config, parsed_dag, rollout_stack, task_states
from tests.datagen import good_records, write_jsonl
from tests.integration.conftest import curated_dataset, tiny_model, tiny_training_job  # noqa: F401
from tests.integration.test_llm_drift_monitor_dag import write_capture

pytestmark = [pytest.mark.integration, pytest.mark.model]

# Flags that say whether a re-run found its work done; the rest of an XCom must not change.
REUSE_FLAGS = frozenset({"created", "reused", "changed", "alias_moved"})
NEWLINE = b"\n"
# Tasks whose effect is an Airflow event: an asset event, or a triggered DAG run.
SIGNALS = frozenset({"announce_dataset", "promote_challenger", "request_retraining"})


# -- running one task of a finished run again -------------------------------------------------------


@contextmanager
def stack_env(env: dict[str, str]) -> Iterator[None]:
    """The stack's environment while tasks run (settings are read from it)."""
    from llmops.config import get_settings

    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()


def rerun_task(dag, run_id: str, task_id: str, timeout: float = 600) -> str:
    """Clear ``task_id`` in the finished run ``run_id`` and run the run again until it finishes, as
    the scheduler would after a clear of that task alone; returns the task's new state."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import DagRunState, TaskInstanceState
    from sqlalchemy import select

    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    session = settings.Session()
    try:
        cleared = scheduler_dag.clear(
            task_ids=[task_id], run_id=run_id, dag_run_state=DagRunState.RUNNING, session=session
        )
        session.commit()
        assert cleared, f"{dag.dag_id} run {run_id} has no task instance {task_id} to clear"
        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id))
        run.dag = scheduler_dag
        deadline = time.monotonic() + timeout
        while run.state == DagRunState.RUNNING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag.dag_id} {run_id}: still running {timeout}s after clearing {task_id}")
            session.expire_all()
            schedulable, _ = run.update_state(session=session)
            for ti in schedulable:
                if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                    ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
            session.commit()
            scheduled = [
                ti for ti in run.get_task_instances(session=session) if ti.state == TaskInstanceState.SCHEDULED
            ]
            unexpected = sorted(ti.task_id for ti in scheduled if ti.task_id != task_id)
            assert not unexpected, f"clearing {task_id} alone made {unexpected} run again"
            for ti in scheduled:
                _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
            if not scheduled and run.state == DagRunState.RUNNING:
                time.sleep(0.5)
        states = {ti.task_id: ti.state for ti in run.get_task_instances(session=session)}
        return str(states[task_id])
    finally:
        session.close()


def task_xcoms(dag_id: str, run_id: str, task_id: str) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id=dag_id, run_id=run_id, task_id=task_id).all()
        return {row.key: XComModel.deserialize_value(row) for row in rows}


def without_reuse_flags(value):
    if isinstance(value, dict):
        return {k: without_reuse_flags(v) for k, v in value.items() if k not in REUSE_FLAGS}
    if isinstance(value, list):
        return [without_reuse_flags(v) for v in value]
    return value


# -- what a user can see ------------------------------------------------------------------------------

# MLflow columns that record when, not what: a re-run may touch them without changing anything.
TIME_COLUMN = re.compile(r"(^|_)(time|timestamp|time_ms|timestamp_ms)$|^last_updated")


# A run's own partition of the store (``runs/<dag>/<run>/``): a re-run of a task overwrites its
# output there, as Airflow's best practice has it. Its files may be rewritten (a validation result
# records when it ran), never added or removed; whatever else is rewritten is a change.
RUN_PARTITION = re.compile(r"^file store/runs/[^/]+/[^/]+/")


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def files_snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by content (JSON lines files also by record count); databases
    aside. A file in a run's partition is named by its path with digits masked, so that an output
    replaced under a new time stamp (a validation's Data Docs page) reads as rewritten, and one
    added beside it as added."""
    objects = {}
    if not root.is_dir():
        return objects
    seen: Counter = Counter()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if re.search(r"\.db(-journal|-wal|-shm)?$", path.name) or path.suffix in (".log", ".pid", ".tmp"):
            continue
        payload = path.read_bytes()
        value = _digest(payload)
        if path.suffix == ".jsonl":
            value = f"{payload.count(NEWLINE)} records, sha256 {value}"
        name = f"file {path.relative_to(root)}"
        if RUN_PARTITION.match(name):
            masked = re.sub(r"\d", "#", name)
            seen[masked] += 1
            name, value = f"{masked} #{seen[masked]}", f"{value} ({path.relative_to(root)})"
        objects[name] = value
    return objects


def mlflow_snapshot(tracking_uri: str) -> dict[str, str]:
    """Every row of every table of MLflow's store; rows of a table with a primary key are named by
    it (so a changed value reads as one change), the others by their content and a count."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(tracking_uri)
    objects: dict[str, str] = {}
    try:
        inspector = inspect(engine)
        with engine.connect() as connection:
            for table in sorted(inspector.get_table_names()):
                if table == "alembic_version":
                    continue
                columns = [c["name"] for c in inspector.get_columns(table) if not TIME_COLUMN.search(c["name"])]
                key_columns = [c for c in inspector.get_pk_constraint(table)["constrained_columns"] if c in columns]
                if len(key_columns) < len(inspector.get_pk_constraint(table)["constrained_columns"]):
                    key_columns = []  # a timestamp is part of the key (metric points): count equal rows
                quoted = ", ".join(f'"{c}"' for c in columns)
                seen: Counter = Counter()
                for row in connection.execute(text(f'SELECT {quoted} FROM "{table}"')):
                    values = dict(zip(columns, row, strict=True))
                    rest = {k: _plain(v) for k, v in values.items() if k not in key_columns}
                    if key_columns:
                        name = ", ".join(f"{c}={_plain(values[c])}" for c in key_columns)
                        objects[f"mlflow {table} [{name}]"] = json.dumps(rest, sort_keys=True, default=str)
                    else:
                        content = json.dumps(rest, sort_keys=True, default=str)
                        seen[content] += 1
                        objects[f"mlflow {table} {content} #{seen[content]}"] = "present"
    finally:
        engine.dispose()
    return objects


def _plain(value):
    if isinstance(value, bytes):
        return f"<{len(value)} bytes sha256 {_digest(value)}>"
    if isinstance(value, str) and len(value) > 300:
        return f"{value[:120]}... <{len(value)} chars sha256 {_digest(value.encode())}>"
    return value


def gateway_snapshot(state_dir: Path | None) -> dict[str, str]:
    """The gateway's models, endpoint configs and endpoints, as it records them."""
    if state_dir is None or not (state_dir / "gateway.json").is_file():
        return {}
    state = json.loads((state_dir / "gateway.json").read_text())
    objects = {f"gateway model {m['ModelName']}": json.dumps(m, sort_keys=True) for m in state["models"]}
    objects |= {
        f"gateway endpoint-config {c['EndpointConfigName']}": json.dumps(c, sort_keys=True)
        for c in state["endpoint_configs"]
    }
    objects |= {f"gateway endpoint {e['EndpointName']}": json.dumps(e, sort_keys=True) for e in state["endpoints"]}
    return objects


def airflow_snapshot(since_event: int, earlier_runs: set[tuple[str, str]]) -> dict[str, str]:
    """Asset events after ``since_event`` and DAG runs not in ``earlier_runs``: what one class made."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    objects: dict[str, str] = {}
    with create_session() as session:
        events: Counter = Counter()
        for event, name in (
            session.query(AssetEvent, AssetModel.name)
            .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
            .filter(AssetEvent.id > since_event)
        ):
            content = json.dumps(
                {
                    "asset": name,
                    "extra": event.extra,
                    "from": f"{event.source_dag_id}.{event.source_task_id} ({event.source_run_id})",
                },
                sort_keys=True,
                default=str,
            )
            events[content] += 1
            objects[f"airflow asset-event {content} #{events[content]}"] = "present"
        for dag_run in session.query(DagRun):
            if (dag_run.dag_id, dag_run.run_id) not in earlier_runs:
                objects[f"airflow dag-run {dag_run.dag_id} {dag_run.run_id}"] = json.dumps(
                    {"state": str(dag_run.state), "conf": dag_run.conf}, sort_keys=True, default=str
                )
    return objects


def task_state_snapshot(label: str, run) -> dict[str, str]:
    objects = {}
    for task_id, state in task_states(run).items():
        if task_id in SIGNALS and state in ("success", "skipped"):
            state = "success, or skipped as its event exists"
        objects[f"airflow task-state {label}: {run.dag_id}.{task_id}"] = str(state)
    return objects


def last_event_id() -> int:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import func

    with create_session() as session:
        return session.query(func.max(AssetEvent.id)).scalar() or 0


def all_dag_runs() -> set[tuple[str, str]]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return {(r.dag_id, r.run_id) for r in session.query(DagRun.dag_id, DagRun.run_id)}


def difference(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], list[str]]:
    """(changes, run-partition files rewritten) from ``before`` to ``after``."""
    changes = [f"+ {k}: {after[k]}" for k in sorted(after.keys() - before.keys())]
    changes += [f"- {k}: {before[k]}" for k in sorted(before.keys() - after.keys())]
    changed = [k for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    changes += [f"~ {k}: {before[k]} -> {after[k]}" for k in changed if not RUN_PARTITION.match(k)]
    return changes, [k for k in changed if RUN_PARTITION.match(k)]


def account(ledger, before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Expected: the objects before; delivered: those still there, unchanged (or rewritten in
    place in a run's own partition). Returns the changes."""
    changes, rewritten = difference(before, after)
    ledger.account(len(before), sum(before[k] == after.get(k) for k in before) + len(rewritten))
    if rewritten:
        ledger.figure("run_files_rewritten", len(rewritten))
    return changes


# -- a finished run and its re-runs ---------------------------------------------------------------------


@dataclass
class FinishedRun:
    """A DAG run finished on a stack of its own, and what re-running its tasks did."""

    dag: object
    env: dict[str, str]
    home: Path
    gateway_state: Path | None = None
    runs: dict[str, object] = field(default_factory=dict)  # label -> DagRun
    since_event: int = 0
    earlier_runs: set = field(default_factory=set)
    first: dict[str, str] = field(default_factory=dict)
    rerun: set = field(default_factory=set)

    def snapshot(self) -> dict[str, str]:
        from llmops.config import load_settings

        with stack_env(self.env):
            tracking_uri = load_settings("local").mlflow.tracking_uri
        objects = files_snapshot(self.home)
        objects |= mlflow_snapshot(tracking_uri)
        objects |= gateway_snapshot(self.gateway_state)
        objects |= airflow_snapshot(self.since_event, self.earlier_runs)
        for label, run in self.runs.items():
            objects |= task_state_snapshot(label, run)
        return objects

    def start(self) -> None:
        """Called before the first run: what existed before is not this class's doing."""
        self.since_event, self.earlier_runs = last_event_id(), all_dag_runs()

    def finish(self, label: str, run) -> None:
        assert run.state == "success", task_states(run)
        self.runs[label] = run
        self.first = self.snapshot()


def check_rerun(finished: FinishedRun, label: str, task_id: str, ledger) -> None:
    run = finished.runs[label]
    states = task_states(run)
    assert task_id in states, f"{task_id} is not a task of {run.dag_id}: update the case list"
    before = finished.snapshot()
    xcoms = task_xcoms(run.dag_id, run.run_id, task_id)
    with stack_env(finished.env):
        state = rerun_task(finished.dag, run.run_id, task_id)
    finished.rerun.add((label, task_id))
    after = finished.snapshot()
    changes = account(ledger, before, after)
    assert not changes, f"re-running {task_id} of {run.run_id} changed {len(changes)} object(s):\n" + "\n".join(changes)
    first = str(states[task_id])
    allowed = {first, "skipped"} if task_id in SIGNALS and first == "success" else {first}
    assert state in allowed, f"{task_id}: {first} the first time, {state} when re-run"
    again = task_xcoms(run.dag_id, run.run_id, task_id)
    assert without_reuse_flags(again) == without_reuse_flags(xcoms), (
        f"{task_id} returned another XCom when re-run:\nfirst: {json.dumps(xcoms, default=str)[:3000]}\n"
        f"again: {json.dumps(again, default=str)[:3000]}"
    )


def check_end_state(finished: FinishedRun, expected_cases: list, ledger) -> None:
    missing = [c for c in expected_cases if c not in finished.rerun]
    if missing:
        pytest.skip(f"{len(missing)} of {len(expected_cases)} tasks were not re-run in this session")
    after = finished.snapshot()
    ledger.figure("tasks_rerun", len(finished.rerun))
    changes = account(ledger, finished.first, after)
    assert not changes, "after every re-run:\n" + "\n".join(changes)


def pytest_generate_tests(metafunc):
    cases = getattr(metafunc.cls, "CASES", None)
    if cases is not None and "case" in metafunc.fixturenames:
        labels = {label for label, _ in cases}
        ids = [task if len(labels) == 1 else f"{label}.{task}" for label, task in cases]
        metafunc.parametrize("case", cases, ids=ids)


class RerunEachTask:
    """Each case re-runs one task (``CASES``: (run label, task id)); the last checks the end state."""

    CASES: tuple[tuple[str, str], ...] = ()

    @pytest.mark.reliability("idempotency")
    def test_clear_and_rerun_duplicates_nothing(self, finished, case, ledger):
        check_rerun(finished, *case, ledger)

    @pytest.mark.reliability("idempotency")
    def test_after_every_task_was_rerun_nothing_changed_since_the_first_run(self, finished, ledger):
        every = {(label, t) for label, run in finished.runs.items() for t in task_states(run)}
        assert every == set(self.CASES), f"tasks of the runs not in CASES: {sorted(every - set(self.CASES))}"
        check_end_state(finished, self.CASES, ledger)


# -- llm_data_prep ------------------------------------------------------------------------------------

DATA_PREP_TASKS = [
    "resolve_config",
    "ingest_raw",
    "clean_text",
    "deduplicate",
    "scrub_pii",
    "sync_prompts",
    "format_instructions",
    "split_dataset",
    "profile_tokens",
    "validate_dataset",
    "publish_version",
    "announce_dataset",
]


class TestLlmDataPrep(RerunEachTask):
    CASES = tuple(("run", t) for t in reversed(DATA_PREP_TASKS))

    @pytest.fixture(scope="class")
    def finished(self, airflow_db, tmp_path_factory):
        home = tmp_path_factory.mktemp("idem-data-prep")
        raw = write_jsonl(home / "raw.jsonl", good_records(40))
        env = {"LLMOPS_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
        with parsed_dag("llm_data_prep", **env) as dag:
            finished = FinishedRun(dag, env, home)
            finished.start()
            run = dag.test(
                run_conf={
                    "raw_uri": str(raw),
                    "template": "python_docs_qa",
                    "max_tokens": 512,
                    "over_length": "drop",
                    "scrub_pii": True,
                }
            )
        finished.finish("run", run)
        return finished


# -- llm_finetune -------------------------------------------------------------------------------------

FINETUNE_TASKS = [
    "resolve_config",
    "select_dataset",
    "decide_training",
    "choose_backend",
    "train_adapter",
    "stage_sagemaker_job",
    "run_sagemaker_job",
    "stage_ec2_job",
    "launch_trainium_instance",
    "await_ssm_agent",
    "run_training_command",
    "collect_ec2_job",
    "terminate_trainium_instance",
    "collect_training",
    "profile_baseline",
    "register_model",
    "sync_prompts",
    "evaluate_models",
    "judge_responses",
    "decide_promotion",
    "record_evaluation",
    "route_decision",
    "await_approval",
    "promote_challenger",
    "record_outcome",
]


class TestLlmFinetune(RerunEachTask):
    """A local LoRA run on the tiny model that passes the gate and becomes the challenger."""

    CASES = tuple(("run", t) for t in reversed(FINETUNE_TASKS))

    @pytest.fixture(scope="class")
    def finished(self, airflow_db, curated_dataset, tiny_model):  # noqa: F811
        home = Path(curated_dataset["uri"].split("/store/")[0].removeprefix("file://"))
        env = {
            "LLMOPS_HOME": str(home),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
            "LLMOPS_CONFIG_FILE": str(fast_config(home, gate={})),
        }
        with parsed_dag("llm_finetune", **env) as dag:
            finished = FinishedRun(dag, env, home)
            finished.start()
            run = dag.test(
                run_conf={
                    "dataset_version": "latest",
                    "base_model": str(tiny_model),
                    "peft_method": "lora",
                    "lora_r": 4,
                    "lora_alpha": 8,
                    "epochs": 1.0,
                    "max_steps": 2,
                    "learning_rate": 0.01,
                    "batch_size": 2,
                    "precision": "fp32",
                    "backend": "local",
                    "processes": 1,
                    "force": False,
                    "reason": "",
                    "drift_run_id": "",
                    "require_approval": False,
                }
            )
        finished.finish("run", run)
        assert task_states(run)["promote_challenger"] == "success", "the run should reach the challenger alias"
        return finished


# -- llm_rollout --------------------------------------------------------------------------------------

ROLLOUT_TASKS = [
    "plan_rollout",
    "deploy_champion",
    "deploy_shadow",
    "compare_shadow",
    "shift_traffic_50pct",
    "shift_traffic_100pct",
    "promote",
    "roll_back",
    "record_rollout",
    "restore_on_failure",
]
ROLLOUT_FORM = {
    "model_version": "",
    "replay_requests": 6,
    "step_requests": 4,
    "min_shadow_win_rate": 0.4,
    "max_error_rate": 0.0,
    "max_p99_latency_ms": 60000,
    "bake_seconds": 0,
}


class TestLlmRollout(RerunEachTask):
    """Version 1 deployed first (no champion yet), then version 2 through shadow and both A/B steps
    to promotion, on a local gateway. The first run's tasks are re-run after the second run
    finished: clearing an old run must not take the endpoint back."""

    CASES = tuple((run, t) for run in ("shadow_run", "first_deploy_run") for t in reversed(ROLLOUT_TASKS))

    @pytest.fixture(scope="class")
    def finished(self, airflow_db, tmp_path_factory, tiny_training_job, curated_dataset):  # noqa: F811
        from llmops.tracking import CHALLENGER, client

        root = tmp_path_factory.mktemp("idem-rollout")
        with rollout_stack(root, tiny_training_job, curated_dataset) as stack:
            tracking = stack["tracking"]
            with parsed_dag("llm_rollout", **stack["env"]) as dag:
                finished = FinishedRun(dag, stack["env"], Path(stack["home"]), gateway_state=stack["gateway_state"])
                finished.start()
                client(tracking).set_registered_model_alias(MODEL, CHALLENGER, "1")
                first = dag.test(run_conf=ROLLOUT_FORM)
                assert first.state == "success", task_states(first)
                client(tracking).set_registered_model_alias(MODEL, CHALLENGER, "2")
                second = dag.test(run_conf=ROLLOUT_FORM)
            assert task_states(second)["promote"] == "success", task_states(second)
            finished.runs["first_deploy_run"] = first
            finished.finish("shadow_run", second)
            yield finished


# -- llm_drift_monitor --------------------------------------------------------------------------------

DRIFT_TASKS = [
    "resolve_window",
    "load_baseline",
    "analyze_window",
    "record_report",
    "decide_retraining",
    "request_retraining",
]


class TestLlmDriftMonitor(RerunEachTask):
    """An hour of off-domain traffic against the champion: drift, reported in MLflow, and one
    retraining request (an llm_finetune run)."""

    CASES = tuple(("run", t) for t in reversed(DRIFT_TASKS))

    @pytest.fixture(scope="class")
    def finished(self, airflow_db, tmp_path_factory, tiny_training_job, curated_dataset):  # noqa: F811
        from devtools import traffic
        from llmops.config import INCLUDE_DIR
        from llmops.tracking import CHAMPION, client, record_training

        root = tmp_path_factory.mktemp("idem-drift")
        home = root / "home"
        home.mkdir()
        config = yaml.safe_load((INCLUDE_DIR / "config" / "local.yaml").read_text())
        policy = {**config["monitoring"]["policy"], "min_records": 20, "permutations": 199, "cooldown_hours": 24}
        config["monitoring"] = {**config["monitoring"], "policy": policy}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        tracking = f"sqlite:///{home}/mlflow.db"
        registered = record_training(
            tracking,
            (home / "artifacts").as_uri(),
            MODEL,
            tiny_training_job,
            curated_dataset,
            {"peft_method": "lora"},
            {"dag_id": "llm_finetune", "run_id": "train-1", "git_sha": "test"},
        )
        client(tracking).set_registered_model_alias(MODEL, CHAMPION, registered.version)
        # A window of its own, so no other test's retraining request shares its run id.
        start = datetime(2026, 10, 3, 7, 0, tzinfo=UTC)
        write_capture(home / "capture", traffic.off_domain_prompts(40), start + timedelta(minutes=5))
        env = {
            "LLMOPS_HOME": str(home),
            "MLFLOW_TRACKING_URI": tracking,
            "LLMOPS_CONFIG_FILE": str(root / "config.yaml"),
        }
        with parsed_dag("llm_drift_monitor", **env) as dag:
            finished = FinishedRun(dag, env, home)
            finished.start()
            run = dag.test(
                run_conf={
                    "window_start": start.isoformat(),
                    "window_end": (start + timedelta(hours=1)).isoformat(),
                    "min_records": 20,
                    "cooldown_hours": 24,
                }
            )
        finished.finish("run", run)
        assert task_states(run)["request_retraining"] == "success", "the window should ask for retraining"
        return finished
