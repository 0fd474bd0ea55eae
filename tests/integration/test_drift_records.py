"""The drift monitor's MLflow bookkeeping on a real (SQLite) tracking store: a report whose
upload failed is completed by the retry, the cooldown holds across windows analysed in any
order, and an unreachable tracking server is a failure, not "no champion"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from llmops import storage
from llmops.drift import monitor as monitoring
from llmops.tracking import client

pytestmark = [pytest.mark.integration]

CHAMPION = {"model_name": "m", "version": "1", "dataset_version": "d" * 12, "baseline_uri": "file:///b"}


@pytest.fixture
def tracked(settings, tmp_path, monkeypatch):
    """Settings with a tracking store in ``tmp_path`` and a registered version 1 of ``m``."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = settings.model_copy(
        update={
            "mlflow": settings.mlflow.model_copy(update={"tracking_uri": uri}),
            "finetune": settings.finetune.model_copy(update={"model_name": "m"}),
        }
    )
    mlflow_client = client(uri)
    mlflow_client.create_registered_model("m")
    run = mlflow_client.create_run(mlflow_client.create_experiment("m"))
    mlflow_client.create_model_version("m", "file:///x", run_id=run.info.run_id)
    return settings


def analysis_for(settings, window: dict, verdict: str = "drift") -> dict:
    folder = monitoring.report_folder(settings, window)
    for name in ("report.json", "report.md", "report.html"):
        storage.write_bytes(storage.join(folder, name), b"{}" if name.endswith("json") else b"report")
    return {
        "verdict": verdict,
        "reasons": ["prompt embeddings moved"],
        "records": 80,
        "answered": 80,
        "metrics": {"drift.records": 80.0},
        "checks": [],
        "folder": folder,
        "files": ["report.html", "report.json", "report.md"],
        "sha256": f"digest-{window['key']}",
    }


def window_at(hour: int, day: int = 22) -> dict:
    start = datetime(2026, 11, day, hour, tzinfo=UTC)
    return monitoring.resolve_window(
        "ep", start.isoformat(), (start + timedelta(hours=1)).isoformat(), None, None, None
    )


def test_a_report_whose_upload_failed_is_completed_by_the_retry(tracked, monkeypatch):
    from mlflow import MlflowClient

    window = window_at(10)
    analysis = analysis_for(tracked, window)
    policy = tracked.monitoring.drift_policy()
    real = MlflowClient.log_artifacts

    def failing(self, *args, **kwargs):
        raise OSError("artifact store unavailable")

    monkeypatch.setattr(MlflowClient, "log_artifacts", failing)
    with pytest.raises(OSError, match="artifact store unavailable"):
        monitoring.record_report(tracked, window, CHAMPION, analysis, policy, {})
    monkeypatch.setattr(MlflowClient, "log_artifacts", real)

    retried = monitoring.record_report(tracked, window, CHAMPION, analysis, policy, {})

    mlflow_client = client(tracked.mlflow.tracking_uri)
    run = mlflow_client.get_run(retried["run_id"])
    assert retried["changed"] and run.info.status == "FINISHED"
    assert run.data.tags["drift.report_sha256"] == analysis["sha256"]
    assert {a.path for a in mlflow_client.list_artifacts(retried["run_id"], "drift")} >= {"drift/report.html"}
    experiment = mlflow_client.get_experiment_by_name(tracked.monitoring.experiment)
    assert len(mlflow_client.search_runs([experiment.experiment_id])) == 1  # the same run, completed
    again = monitoring.record_report(tracked, window, CHAMPION, analysis, policy, {})
    assert again == {**retried, "changed": False}


def test_the_cooldown_holds_whatever_order_windows_are_analysed_in(tracked):
    policy = tracked.monitoring.drift_policy()
    now = datetime(2026, 11, 22, 21, 5, tzinfo=UTC)
    late = window_at(20)
    recorded = monitoring.record_report(tracked, late, CHAMPION, analysis_for(tracked, late), policy, {})
    first = monitoring.decide(tracked, late, CHAMPION, analysis_for(tracked, late), recorded, policy, now=now)
    assert first["trigger"]

    # A backfill of a window two days earlier, analysed an hour later, is drift too: no second request.
    old = window_at(9, day=20)
    old_recorded = monitoring.record_report(tracked, old, CHAMPION, analysis_for(tracked, old), policy, {})
    later = now + timedelta(hours=1)
    backfill = monitoring.decide(tracked, old, CHAMPION, analysis_for(tracked, old), old_recorded, policy, now=later)
    assert not backfill["trigger"] and "cooldown of 24 h" in backfill["reason"]

    # Re-deciding the first window (a retried task) asks again with the same run id: the trigger
    # operator skips it as existing, and the request keeps its first time.
    again = monitoring.decide(tracked, late, CHAMPION, analysis_for(tracked, late), recorded, policy, now=later)
    assert again["trigger"] and again["run_id"] == first["run_id"]
    tags = client(tracked.mlflow.tracking_uri).get_run(recorded["run_id"]).data.tags
    assert tags["drift.retrain_requested_at"] == now.isoformat()

    # A day after the request, drift may ask again.
    next_day = monitoring.decide(
        tracked, old, CHAMPION, analysis_for(tracked, old), old_recorded, policy, now=now + timedelta(hours=25)
    )
    assert next_day["trigger"]


def test_an_unreachable_tracking_server_fails_instead_of_reporting_no_champion(settings, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    unreachable = settings.model_copy(
        update={"mlflow": settings.mlflow.model_copy(update={"tracking_uri": "http://127.0.0.1:9"})}
    )
    with pytest.raises(Exception) as raised:
        monitoring.champion_baseline(unreachable)
    assert "127.0.0.1:9" in str(raised.value) or "Connection" in type(raised.value).__name__ + str(raised.value)


def test_a_missing_model_or_alias_is_no_champion(tracked):
    assert monitoring.champion_baseline(tracked) is None  # "m" has no champion alias
    other = tracked.model_copy(update={"finetune": tracked.finetune.model_copy(update={"model_name": "nope"})})
    assert monitoring.champion_baseline(other) is None
