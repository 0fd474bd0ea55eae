"""llm_drift_monitor with dag.test(): captured traffic written in SageMaker's capture layout is
compared with the champion's baseline; drift is reported in MLflow and asks llm_finetune to
retrain (its run's conf says why), in-domain traffic does not, and re-running a window changes
nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from devtools import traffic
from llmops.tracking import CHAMPION, client
from tests.dagruns import parsed_dag, task_states

pytestmark = [pytest.mark.integration, pytest.mark.model]

ENDPOINT = "python-docs-assistant"
MONITOR_POLICY = {"min_records": 20, "permutations": 199, "cooldown_hours": 24}


def write_capture(capture: Path, prompts: list[str], start: datetime, status: int = 200, variant: str = "v1") -> None:
    """One captured call per prompt, a second apart from ``start``, in the gateway's layout."""
    from serving.capture import capture_record

    for index, prompt in enumerate(prompts):
        moment = start + timedelta(seconds=index)
        body = {"inputs": [{"role": "user", "content": prompt}], "parameters": {"max_new_tokens": 32}}
        answer = {"generated_text": f"In Python, this works as documented ({index}).", "finish_reason": "stop"}
        record = capture_record(
            endpoint=ENDPOINT,
            variant=variant,
            request=json.dumps(body).encode(),
            request_type="application/json",
            response=json.dumps(answer).encode() if status == 200 else b'{"error": "boom"}',
            response_type="application/json",
            status_code=status,
            latency_ms=40.0 + index % 7,
            inference_time=moment,
            event_id=f"{variant}-{moment:%H%M%S}-{index}",
        )
        folder = capture / ENDPOINT / variant / moment.strftime("%Y/%m/%d/%H")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "capture.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def in_domain_prompts(dataset: dict) -> list[str]:
    from llmops import storage

    return [
        r["prompt"]
        for split in ("train", "validation", "test")
        for r in storage.read_jsonl(dataset["files"][split]["uri"])
    ]


@pytest.fixture
def stack(tmp_path, airflow_db, tiny_training_job, curated_dataset):
    """A state folder whose champion is a registered tiny adapter trained on ``curated_dataset``
    (registered without a baseline: the monitor builds it), and a config with a quick policy."""
    from llmops.config import INCLUDE_DIR
    from llmops.tracking import record_training

    home = tmp_path / "home"
    home.mkdir()
    config = yaml.safe_load((INCLUDE_DIR / "config" / "local.yaml").read_text())
    config["monitoring"] = {**config["monitoring"], "policy": {**config["monitoring"]["policy"], **MONITOR_POLICY}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    tracking = f"sqlite:///{home}/mlflow.db"
    registered = record_training(
        tracking,
        (home / "artifacts").as_uri(),
        "python-docs-assistant",
        tiny_training_job,
        curated_dataset,
        {"peft_method": "lora"},
        {"dag_id": "llm_finetune", "run_id": "train-1", "git_sha": "test"},
    )
    client(tracking).set_registered_model_alias("python-docs-assistant", CHAMPION, registered.version)
    return {
        "home": home,
        "capture": home / "capture",
        "tracking": tracking,
        "dataset": curated_dataset,
        "env": {
            "LLMOPS_HOME": str(home),
            "MLFLOW_TRACKING_URI": tracking,
            "LLMOPS_CONFIG_FILE": str(tmp_path / "config.yaml"),
        },
    }


def run_monitor(stack, start: datetime, end: datetime):
    with parsed_dag("llm_drift_monitor", **stack["env"]) as dag:
        return dag.test(run_conf={"window_start": start.isoformat(), "window_end": end.isoformat()})


def finetune_runs() -> list:
    from airflow.models import DagRun

    return DagRun.find(dag_id="llm_finetune")


def drift_runs(tracking: str) -> list:
    mlflow_client = client(tracking)
    experiment = mlflow_client.get_experiment_by_name("llmops-drift-monitoring")
    return mlflow_client.search_runs([experiment.experiment_id]) if experiment else []


def test_off_domain_traffic_is_drift_reported_in_mlflow_and_asks_for_retraining(stack):
    start = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
    write_capture(stack["capture"], traffic.off_domain_prompts(40), start + timedelta(minutes=5))
    before = {r.run_id for r in finetune_runs()}

    dag_run = run_monitor(stack, start, start + timedelta(hours=1))

    states = task_states(dag_run)
    assert set(states.values()) == {"success"}, states
    runs = drift_runs(stack["tracking"])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["drift.verdict"] == "drift"
    assert run.data.tags["model_version"] == "1"
    assert run.data.metrics["drift.records"] == 40
    assert run.data.tags["drift.retrain_requested"] == "true"
    artifacts = {a.path for a in client(stack["tracking"]).list_artifacts(run.info.run_id, "drift")}
    assert {"drift/report.html", "drift/report.md", "drift/report.json"} <= artifacts
    version = client(stack["tracking"]).get_model_version("python-docs-assistant", "1")
    assert version.tags["drift.last_verdict"] == "drift"
    assert version.tags["drift.last_run_id"] == run.info.run_id
    assert version.tags["drift.baseline_uri"].endswith("-v1")

    new = [r for r in finetune_runs() if r.run_id not in before]
    assert len(new) == 1
    assert new[0].run_id == "drift__python-docs-assistant__20261122T090000Z-20261122T100000Z"
    assert new[0].conf["drift_run_id"] == run.info.run_id
    assert new[0].conf["reason"].startswith("drift on python-docs-assistant (champion version 1)")
    assert "embedding" in new[0].conf["reason"] or "prompt embeddings" in new[0].conf["reason"]

    # Re-running the window changes nothing: the same MLflow run, no second retraining request.
    tags_before = dict(client(stack["tracking"]).get_run(run.info.run_id).data.tags)
    again = run_monitor(stack, start, start + timedelta(hours=1))
    assert task_states(again)["record_report"] == "success"
    assert task_states(again)["request_retraining"] == "skipped"  # the run already exists
    assert [r.info.run_id for r in drift_runs(stack["tracking"])] == [run.info.run_id]
    assert dict(client(stack["tracking"]).get_run(run.info.run_id).data.tags) == tags_before
    assert len([r for r in finetune_runs() if r.run_id not in before]) == 1


def test_in_domain_traffic_raises_no_alarm_and_too_few_calls_give_no_verdict(stack):
    start = datetime(2026, 11, 22, 11, 0, tzinfo=UTC)
    write_capture(stack["capture"], in_domain_prompts(stack["dataset"]), start + timedelta(minutes=1))
    # Shadow copies of the same calls are not traffic: they would double every prompt.
    write_capture(stack["capture"], traffic.off_domain_prompts(30), start + timedelta(minutes=2), variant="v2")
    for path in (stack["capture"] / ENDPOINT / "v2").rglob("*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        for line in lines:
            line["eventMetadata"]["shadow"] = True
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    before = {r.run_id for r in finetune_runs()}

    ok = run_monitor(stack, start, start + timedelta(hours=1))
    quiet = run_monitor(stack, start + timedelta(hours=1), start + timedelta(hours=2))

    assert task_states(ok)["request_retraining"] == "skipped"
    assert task_states(quiet)["request_retraining"] == "skipped"
    verdicts = {r.data.tags["drift.window_start"]: r.data.tags["drift.verdict"] for r in drift_runs(stack["tracking"])}
    assert verdicts == {start.isoformat(): "ok", (start + timedelta(hours=1)).isoformat(): "no_verdict"}
    by_start = {r.data.tags["drift.window_start"]: r for r in drift_runs(stack["tracking"])}
    assert by_start[start.isoformat()].data.metrics["drift.records"] == 60
    assert (
        "a verdict needs at least 20" in by_start[(start + timedelta(hours=1)).isoformat()].data.tags["drift.reasons"]
    )
    assert {r.run_id for r in finetune_runs()} == before


def test_a_second_drift_within_the_cooldown_does_not_ask_again(stack):
    start = datetime(2026, 11, 22, 14, 0, tzinfo=UTC)
    for hour in (0, 1):
        write_capture(
            stack["capture"], traffic.foreign_prompts(30, "ru", seed=hour), start + timedelta(hours=hour, minutes=3)
        )
    before = {r.run_id for r in finetune_runs()}

    first = run_monitor(stack, start, start + timedelta(hours=1))
    second = run_monitor(stack, start + timedelta(hours=1), start + timedelta(hours=2))

    assert task_states(first)["request_retraining"] == "success"
    assert task_states(second)["request_retraining"] == "skipped"
    runs = {r.data.tags["drift.window_start"]: r for r in drift_runs(stack["tracking"])}
    assert runs[(start + timedelta(hours=1)).isoformat()].data.tags["drift.verdict"] == "drift"
    assert "drift.retrain_requested" not in runs[(start + timedelta(hours=1)).isoformat()].data.tags
    assert len([r for r in finetune_runs() if r.run_id not in before]) == 1


def test_without_a_champion_there_is_nothing_to_watch(stack):
    client(stack["tracking"]).delete_registered_model_alias("python-docs-assistant", CHAMPION)
    start = datetime(2026, 11, 22, 18, 0, tzinfo=UTC)
    dag_run = run_monitor(stack, start, start + timedelta(hours=1))
    states = task_states(dag_run)
    assert states["load_baseline"] == "skipped"
    assert {states[t] for t in ("analyze_window", "record_report", "decide_retraining")} == {"skipped"}
    assert drift_runs(stack["tracking"]) == []


def test_a_champion_without_lineage_for_a_baseline_fails_saying_so(stack):
    mlflow_client = client(stack["tracking"])
    for tag in ("dataset.manifest_uri", "drift.baseline_uri"):
        mlflow_client.delete_model_version_tag("python-docs-assistant", "1", tag)
    start = datetime(2026, 11, 22, 20, 0, tzinfo=UTC)
    dag_run = run_monitor(stack, start, start + timedelta(hours=1))
    states = task_states(dag_run)
    assert states["load_baseline"] == "failed"
    assert dag_run.get_task_instance("load_baseline").try_number == 1  # not retried
    assert drift_runs(stack["tracking"]) == []
