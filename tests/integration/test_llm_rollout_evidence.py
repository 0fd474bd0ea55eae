"""llm_rollout with a policy that states its power (``serving.rollout.evidence``), against a real
gateway serving tiny models: the shadow judged pairwise, each A/B step collecting until its
sequential tests decide (replay topping up, no live users here), every decision saying what it
used, on the version and in the rollout's MLflow record."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from devtools.demo import return_value
from llmops.tracking import CHALLENGER, CHAMPION, client
from tests.dagruns import FAST_ROLLOUT, parsed_dag, rollout_stack, task_states

pytestmark = [pytest.mark.integration, pytest.mark.model]

# Demo-sized: large harms and loose error rates, so a handful of requests decides the rates; the
# judge's stated sample size is beyond a short shadow, which this policy lets through as thin.
EVIDENCE = {
    "alpha": 0.1,
    "beta": 0.2,
    "error_rate_harm": 0.3,
    "p95_increase": 4.0,  # tiny models' latencies are a few ms apart: only a gross slowdown is harm
    "slow_share_harm": 0.5,
    "judge_win_rate_drop": 0.4,
    "max_step_seconds": 60,
    "on_inconclusive": "promote",
    "min_live_invocations": 1000,
    "poll_seconds": 0.2,
}


@pytest.fixture
def stack(tmp_path, airflow_db, tiny_training_job, curated_dataset):
    with rollout_stack(tmp_path, tiny_training_job, curated_dataset) as built:
        path = Path(built["env"]["LLMOPS_CONFIG_FILE"])
        config = yaml.safe_load(path.read_text())
        config["serving"]["rollout"] = {**FAST_ROLLOUT, "evidence": EVIDENCE}
        evidence_config = path.with_name("config-evidence.yaml")
        evidence_config.write_text(yaml.safe_dump(config))
        yield {**built, "env": {**built["env"], "LLMOPS_CONFIG_FILE": str(evidence_config)}}


def test_a_rollout_with_stated_power_records_its_evidence_and_promotes(stack):
    mlflow_client = client(stack["tracking"])
    mlflow_client.set_registered_model_alias("python-docs-assistant", CHALLENGER, "1")
    with parsed_dag("llm_rollout", **stack["env"]) as dag:
        assert dag.test().state == "success"
        mlflow_client.set_registered_model_alias("python-docs-assistant", CHALLENGER, "2")
        run = dag.test()
    states = task_states(run)
    assert run.state == "success", states
    assert states["promote"] == "success" and states["roll_back"] == "skipped", states

    shadow = return_value(run, "compare_shadow")
    evidence = shadow["evidence"]
    assert evidence["judge"].startswith("pairwise")
    assert evidence["observed"]["pairs"] >= FAST_ROLLOUT["shadow"]["min_pairs"]
    assert evidence["observed"]["preference"] == pytest.approx(0.5 * evidence["observed"]["pairs"])  # same adapter
    assert evidence["source"] == "replayed" and evidence["swapped_pairs"] >= 1
    tests = {t["name"]: t for t in evidence["tests"]}
    assert tests["error_rate"]["verdict"] == "no_harm"
    # Too few pairs for the judge's stated sample size: inconclusive, and the decision says so.
    assert tests["judge"]["verdict"] == "undecided"
    assert tests["judge"]["n"] < evidence["stated_sample_size"]["judge"]
    assert any("judge: inconclusive" in r for r in shadow["decision"]["reasons"])
    assert any("shadow evidence: replayed" in r and "thin" in r for r in shadow["decision"]["reasons"])

    step = return_value(run, "shift_traffic_50pct")
    tests = {t["name"]: t for t in step["evidence"]["tests"]}
    # The step replayed until its rate tests decided (no live users: replay tops up).
    assert tests["error_rate"]["verdict"] == "no_harm" and tests["latency"]["verdict"] == "no_harm"
    assert step["evidence"]["source"] in ("replayed", "both")
    assert step["evidence"]["observed"]["replayed"] > 0
    assert any("SPRT" in r and "50pct error_rate: no harm" in r for r in step["decision"]["reasons"])

    assert alias_version(stack, CHAMPION) == "2"
    tags = mlflow_client.get_model_version("python-docs-assistant", "2").tags
    assert "50pct error_rate: no harm" in tags["rollout.50pct.reasons"]
    assert "judge: inconclusive" in tags["rollout.shadow.reasons"]
    metrics = mlflow_client.get_run(tags["rollout.mlflow_run_id"]).data.metrics
    assert metrics["step.50pct.evidence.error_rate.n"] == tests["error_rate"]["n"]
    assert metrics["step.50pct.evidence.error_rate.stated_n"] == step["evidence"]["stated_sample_size"]["error_rate"]
    assert "shadow.judge_position_bias" in metrics or evidence["position_bias"] is None


def alias_version(stack, name: str) -> str:
    return str(client(stack["tracking"]).get_model_version_by_alias("python-docs-assistant", name).version)
