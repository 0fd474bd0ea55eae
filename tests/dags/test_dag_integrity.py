"""Every DAG imports cleanly, fast, without heavy libraries, and has the expected shape."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
HEAVY = ("torch", "transformers", "peft", "datasets", "mlflow", "great_expectations", "pandas", "sentence_transformers")
PARSE_BUDGET_S = 2.0  # CPU seconds: what parsing costs, whatever else the machine is doing
WAIT_BUDGET_S = 15.0  # wall seconds: parsing waits on nothing (no network, no database) for long

_PROBE = """
import json, sys, time
import airflow.sdk  # Airflow's own import cost is not the DAG's
from airflow.dag_processing.dagbag import DagBag
started, cpu_started = time.perf_counter(), time.process_time()
bag = DagBag(dag_folder=sys.argv[1])
elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
print(json.dumps({
    "elapsed": elapsed,
    "cpu": cpu,
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dag_ids": sorted(bag.dag_ids),
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[2])),
}))
"""


@pytest.fixture(scope="module", params=DAG_FILES, ids=lambda p: p.name)
def parsed(request, stack_env):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(request.param), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        env=stack_env | {"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return request.param, json.loads(out.stdout.strip().splitlines()[-1])


def test_dag_imports_without_errors(parsed):
    path, result = parsed
    assert result["errors"] == {}
    assert result["dag_ids"] == [path.stem], "one DAG per file, and the file is named after the dag_id"


def test_dag_parses_within_budget(parsed):
    _, result = parsed
    took = f"parsing took {result['cpu']:.2f} s of CPU, {result['elapsed']:.2f} s in all"
    assert result["cpu"] < PARSE_BUDGET_S, took
    assert result["elapsed"] < WAIT_BUDGET_S, took


def test_dag_file_pulls_in_no_heavy_library(parsed):
    _, result = parsed
    assert result["heavy"] == []


def test_llm_data_prep_graph_and_params(stack_env):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags" / "llm_data_prep.py")).dags["llm_data_prep"]
    chain = [
        "resolve_config",
        "ingest_raw",
        "clean_text",
        "deduplicate",
        "scrub_pii",
        "format_instructions",
        "split_dataset",
        "profile_tokens",
        "validate_dataset",
        "publish_version",
        "announce_dataset",
    ]
    assert set(dag.task_ids) == {*chain, "sync_prompts"}
    for upstream, downstream in itertools.pairwise(chain):
        assert downstream in dag.get_task(upstream).downstream_task_ids, f"{upstream} -> {downstream}"
    assert "format_instructions" in dag.get_task("sync_prompts").downstream_task_ids
    assert dag.schedule is None or str(dag.timetable.summary) == "None"
    assert not dag.catchup
    assert set(dag.params.keys()) == {"raw_uri", "template", "max_tokens", "over_length", "scrub_pii"}
    assert dag.params["raw_uri"] is None
    outlets = dag.get_task("announce_dataset").outlets
    assert len(outlets) == 1 and outlets[0].uri.endswith("/datasets/python-docs-instruct")


def test_llm_finetune_graph_schedule_and_form(stack_env):
    from airflow.dag_processing.dagbag import DagBag

    from llmops.config import get_settings

    dag = DagBag(dag_folder=str(ROOT / "dags" / "llm_finetune.py")).dags["llm_finetune"]
    chain = [
        "resolve_config",
        "select_dataset",
        "decide_training",
        "choose_backend",
        "train_adapter",
        "collect_training",
        "register_model",
        "evaluate_models",
        "judge_responses",
        "decide_promotion",
        "record_evaluation",
        "route_decision",
        "await_approval",
        "promote_challenger",
        "record_outcome",
    ]
    sagemaker = ["stage_sagemaker_job", "run_sagemaker_job"]
    ec2 = ["stage_ec2_job", "launch_trainium_instance", "await_ssm_agent", "run_training_command", "collect_ec2_job"]
    teardown = "terminate_trainium_instance"
    assert set(dag.task_ids) == {*chain, *sagemaker, *ec2, teardown, "sync_prompts", "profile_baseline"}
    # The backend's branch: the local job, SageMaker's job, or the EC2 instance's command; then one result.
    assert dag.get_task("choose_backend").downstream_task_ids == {
        "train_adapter",
        "stage_sagemaker_job",
        "stage_ec2_job",
    }
    for path in (sagemaker, ec2):
        for upstream, downstream in itertools.pairwise(["choose_backend", *path, "collect_training"]):
            assert downstream in dag.get_task(upstream).downstream_task_ids, f"{upstream} -> {downstream}"
    # The instance is terminated whatever happens, as a teardown of its launch: a cleanup that
    # succeeds cannot turn a failed run green.
    terminate = dag.get_task(teardown)
    assert terminate.is_teardown and "launch_trainium_instance" in terminate.upstream_task_ids
    assert "collect_ec2_job" in terminate.upstream_task_ids
    assert dag.get_task("collect_ec2_job").trigger_rule == "all_done", "reads the output tail of a failure too"
    assert dag.get_task("run_training_command").wait_for_completion is False, "collect_ec2_job waits"
    assert dag.get_task("collect_training").trigger_rule == "none_failed_min_one_success"
    assert type(dag.get_task("run_sagemaker_job")).__mro__[1].__name__ == "SageMakerTrainingOperator"
    # The baseline profile is built only when training runs, and registration waits for it.
    assert dag.get_task("profile_baseline").upstream_task_ids >= {"decide_training"}
    assert "register_model" in dag.get_task("profile_baseline").downstream_task_ids
    for upstream, downstream in itertools.pairwise(chain):
        assert downstream in dag.get_task(upstream).downstream_task_ids, f"{upstream} -> {downstream}"
    # The branch reaches every outcome; the approval defaults to rejecting when nobody answers.
    assert dag.get_task("route_decision").downstream_task_ids == {
        "await_approval",
        "promote_challenger",
        "record_outcome",
    }
    approval = dag.get_task("await_approval")
    assert approval.defaults == ["Reject"] and approval.response_timeout.total_seconds() > 0
    assert "evaluate_models" in dag.get_task("sync_prompts").downstream_task_ids
    assert not dag.catchup
    schedule = dag.timetable
    assert f"expression='{get_settings().finetune.schedule}'" in repr(schedule.timetable)
    assert f"timezone='{get_settings().finetune.timezone}'" in repr(schedule.timetable)
    assert "curated_dataset.python-docs-instruct" in str(schedule.asset_condition)
    params = dag.params
    assert params.get_param("backend").schema["enum"] == ["local", "sagemaker", "sagemaker-trainium", "ec2-trainium"]
    assert set(params.get_param("peft_method").schema["enum"]) == {"lora", "prompt_tuning", "full", "qlora"}
    assert {
        "dataset_version",
        "base_model",
        "lora_r",
        "lora_alpha",
        "epochs",
        "max_steps",
        "learning_rate",
        "batch_size",
        "precision",
        "force",
        "reason",
        "drift_run_id",
        "require_approval",
    } <= set(params.keys())
    assert all(params.get_param(k).description or params.get_param(k).schema.get("title") for k in params)


def test_llm_rollout_graph_schedule_and_form(stack_env):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import TriggerRule

    from llmops.config import get_settings

    settings = get_settings()
    dag = DagBag(dag_folder=str(ROOT / "dags" / "llm_rollout.py")).dags["llm_rollout"]
    steps = [f"shift_traffic_{round(s * 100)}pct" for s in settings.serving.policy().traffic_steps]
    chain = ["plan_rollout", "deploy_shadow", "compare_shadow", *steps, "promote", "record_rollout"]
    for upstream, downstream in itertools.pairwise(chain):
        assert downstream in dag.get_task(upstream).downstream_task_ids, f"{upstream} -> {downstream}"
    assert {"deploy_champion", "promote"} <= {*dag.get_task("plan_rollout").downstream_task_ids, "promote"}
    assert "promote" in dag.get_task("deploy_champion").downstream_task_ids
    assert "roll_back" in dag.get_task(steps[-1]).downstream_task_ids
    assert "record_rollout" in dag.get_task("roll_back").downstream_task_ids
    # A failure anywhere before the bookkeeping reaches the task that puts traffic back on the
    # champion; a failed record_rollout must not undo a promotion.
    restore = dag.get_task("restore_on_failure")
    assert restore.trigger_rule == TriggerRule.ONE_FAILED
    assert restore.upstream_task_ids == set(dag.task_ids) - {"restore_on_failure", "record_rollout"}
    assert dag.max_active_runs == 1 and not dag.catchup
    assert "challenger.python-docs-assistant" in str(dag.timetable.asset_condition)
    assert {
        "model_version",
        "replay_requests",
        "step_requests",
        "min_shadow_win_rate",
        "max_error_rate",
        "max_p99_latency_ms",
        "bake_seconds",
    } <= set(dag.params.keys())


def test_finetune_hands_a_new_challenger_to_rollout(stack_env):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags" / "llm_finetune.py")).dags["llm_finetune"]
    outlets = dag.get_task("promote_challenger").outlets
    assert [o.name for o in outlets] == ["challenger.python-docs-assistant"]


def test_llm_drift_monitor_graph_schedule_and_form(stack_env):
    from airflow.dag_processing.dagbag import DagBag

    from llmops.config import get_settings

    settings = get_settings()
    dag = DagBag(dag_folder=str(ROOT / "dags" / "llm_drift_monitor.py")).dags["llm_drift_monitor"]
    chain = ["resolve_window", "load_baseline", "analyze_window", "record_report", "decide_retraining"]
    assert set(dag.task_ids) == {*chain, "request_retraining"}
    for task_id in chain[2:]:
        assert {"resolve_window", "load_baseline"} <= dag.get_task(task_id).upstream_task_ids | set(
            itertools.chain.from_iterable(
                dag.get_task(u).upstream_task_ids for u in dag.get_task(task_id).upstream_task_ids
            )
        )
    assert dag.get_task("decide_retraining").downstream_task_ids == {"request_retraining"}
    trigger = dag.get_task("request_retraining")
    assert trigger.trigger_dag_id == "llm_finetune" and trigger.skip_when_already_exists
    assert set(trigger.conf) == {"reason", "drift_run_id"}, "the finetune form knows every key the monitor sends"
    finetune = DagBag(dag_folder=str(ROOT / "dags" / "llm_finetune.py")).dags["llm_finetune"]
    assert set(trigger.conf) <= set(finetune.params.keys())
    # Hourly over data intervals (not a trigger timetable): each run owns one window.
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert settings.monitoring.schedule in repr(dag.timetable) or dag.timetable.summary == settings.monitoring.schedule
    assert dag.max_active_runs == 1 and not dag.catchup
    assert {"window_start", "window_end", "min_records", "cooldown_hours"} <= set(dag.params.keys())
