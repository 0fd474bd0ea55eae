"""Drift monitoring of captured traffic: the adapters around ``llmops.drift.statistics``.

- **Baselines.** ``ensure_baseline`` profiles a curated dataset version once (the profile and its
  prompt embeddings live in the store under ``baselines/<dataset>/<version>/<encoder>-<n>/``;
  ``profile.json`` is written last, so a half-built baseline is never read). ``llm_finetune``
  builds it before registration and the model version points at it (``drift.baseline_uri``).
  A version registered before baselines existed gets one from its dataset on first use.
- **Windows.** ``resolve_window`` turns the run's data interval (or the form's bounds) into a
  window and its key; ``window_records`` reads the endpoint's captured calls in it (production
  variants only: shadow copies are not traffic).
- **Reports.** ``analyze_window`` runs every check and writes the report (JSON, Markdown, a
  self-contained HTML page with plots) to the store; ``record_report`` logs it as one MLflow
  run per window, linked from the champion's version. Re-running a window finds the same run
  and changes nothing when the report is the same.
- **Retraining.** ``decide`` applies the policy's cooldown (from earlier windows' runs) and
  marks the run before ``llm_finetune`` is triggered, so a retried trigger stays one request.

No Airflow here: the DAG wires these functions together.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

from llmops import storage
from llmops.capture import request_prompt
from llmops.config import ConfigError, Settings
from llmops.contracts import DatasetManifest
from llmops.drift import statistics as drift
from llmops.encoder import make_sentence_encoder
from llmops.tracking import CHAMPION, RUN_KEY, client, ensure_experiment, find_run, metric_entity, report_url
from serving.capture import read_capture

PROFILE, EMBEDDINGS = "profile.json", "embeddings.npy"
BASELINE_TAG = "drift.baseline_uri"
REQUESTED_TAG = "drift.retrain_requested"
REQUESTED_AT_TAG = "drift.retrain_requested_at"


class MonitoringError(RuntimeError):
    """The monitor cannot analyse this window (no champion, no baseline, unreadable capture)."""


# -- baselines ---------------------------------------------------------------------------------


def baseline_uri(settings: Settings, dataset_name: str, dataset_version: str) -> str:
    key = f"{settings.models.embedding}-{settings.monitoring.baseline_sample}-v{drift.PROFILE_FORMAT}"
    return storage.join(settings.store_uri, "baselines", dataset_name, dataset_version, key)


def make_embedder(settings: Settings) -> drift.Embed:
    return make_sentence_encoder(settings).encode


def ensure_baseline(
    settings: Settings,
    dataset: DatasetManifest | dict,
    storage_options: dict | None = None,
    embed: drift.Embed | None = None,
) -> dict:
    """The baseline profile of a curated dataset version (its manifest), built when missing."""
    import numpy as np

    dataset = DatasetManifest.model_validate(dataset)
    uri = baseline_uri(settings, dataset.name, dataset.version)
    profile_uri = storage.join(uri, PROFILE)
    if storage.exists(profile_uri, storage_options):
        return {"uri": uri, "created": False, "summary": storage.read_json(profile_uri, storage_options)["summary"]}
    train = storage.read_jsonl(dataset.files.train.uri, storage_options)
    holdout = storage.read_jsonl(dataset.files.validation.uri, storage_options)
    profile = drift.build_profile(
        train,
        holdout,
        embed or make_embedder(settings),
        dataset=dataset.name,
        dataset_version=dataset.version,
        encoder=settings.models.embedding,
        sample_size=settings.monitoring.baseline_sample,
        seed=drift.seed_for(dataset.version),
    )
    buffer = io.BytesIO()
    np.save(buffer, profile.embeddings, allow_pickle=False)
    storage.write_bytes(storage.join(uri, EMBEDDINGS), buffer.getvalue(), storage_options)
    summary = profile.summary()
    storage.write_json(profile_uri, {**profile.to_dict(), "summary": summary}, storage_options)
    return {"uri": uri, "created": True, "summary": summary}


def load_baseline(uri: str, storage_options: dict | None = None) -> drift.BaselineProfile:
    import numpy as np

    profile_uri = storage.join(uri, PROFILE)
    if not storage.exists(profile_uri, storage_options):
        raise MonitoringError(f"no baseline profile at {profile_uri}")
    data = storage.read_json(profile_uri, storage_options)
    data.pop("summary", None)
    embeddings = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, EMBEDDINGS), storage_options)))
    return drift.BaselineProfile.from_dict(data, embeddings)


def champion_baseline(settings: Settings, storage_options: dict | None = None) -> dict | None:
    """The serving champion (version, dataset) and the URI of its baseline profile (built from
    the version's dataset and recorded on it if the version has none); None without a champion."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(settings.mlflow.tracking_uri)
    name = settings.finetune.model_name
    try:
        version = mlflow_client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # No such model, or no champion alias yet (MLflow's stores say it with either code).
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise  # the tracking server is unreachable or failing: that is not "nothing to watch"
    tags = version.tags
    uri = tags.get(BASELINE_TAG)
    expected = None
    if tags.get("dataset.version"):
        expected = baseline_uri(settings, tags.get("dataset.name", settings.data.dataset_name), tags["dataset.version"])
    if not uri or (expected and uri != expected) or not storage.exists(storage.join(uri, PROFILE), storage_options):
        manifest_uri = tags.get("dataset.manifest_uri")
        if not manifest_uri:
            raise MonitoringError(f"{name} version {version.version} has no baseline and no dataset manifest tag")
        manifest = storage.read_json(manifest_uri, storage_options)
        uri = ensure_baseline(settings, manifest, storage_options)["uri"]
        mlflow_client.set_model_version_tag(name, version.version, BASELINE_TAG, uri)
    return {
        "model_name": name,
        "version": str(version.version),
        "dataset_version": tags.get("dataset.version", ""),
        "baseline_uri": uri,
    }


# -- windows -----------------------------------------------------------------------------------


def _parse(text: str, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{field}: {text!r} is not an ISO-8601 date and time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def resolve_window(
    endpoint: str,
    window_start: str | None,
    window_end: str | None,
    interval_start: datetime | None,
    interval_end: datetime | None,
    run_after: datetime,
    hours: float = 1.0,
    delay_minutes: float = 0.0,
) -> dict:
    """The window a run analyses: the form's bounds if given (a missing end is the run's time, a
    missing start ``hours`` before the end), else the run's data interval, else the ``hours``
    before the run's time (a manual run without a logical date). Windows the form does not name
    end ``delay_minutes`` earlier (capture files reach S3 minutes after the calls): scheduled
    windows stay back to back, each a little behind."""
    if window_start or window_end:
        end = _parse(window_end, "window_end") if window_end else run_after
        start = _parse(window_start, "window_start") if window_start else end - timedelta(hours=hours)
    elif interval_start is not None and interval_end is not None and interval_end > interval_start:
        lag = timedelta(minutes=delay_minutes)
        start, end = interval_start - lag, interval_end - lag
    else:
        end = run_after - timedelta(minutes=delay_minutes)
        start = end - timedelta(hours=hours)
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    if end <= start:
        raise ConfigError(f"window_end ({end.isoformat()}) must come after window_start ({start.isoformat()})")
    stamp = f"{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}"
    return {"endpoint": endpoint, "start": start.isoformat(), "end": end.isoformat(), "key": f"{endpoint}/{stamp}"}


def traffic_record(record) -> drift.TrafficRecord:
    status = record.status_code if record.status_code is not None else 200
    answer = record.response_json() if 200 <= status < 300 else None
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        answer = answer[0]  # Hugging Face inference containers answer [{"generated_text": ...}]
    response = answer.get("generated_text") if isinstance(answer, dict) else None
    _, prompt = request_prompt(record.request_json())
    return drift.TrafficRecord(
        prompt=_text(prompt),
        response=None if response is None else _text(response),
        status=status,
        latency_ms=record.latency_ms,
    )


def _text(value) -> str:
    """A captured prompt or answer as clean text: chat content given as parts (``[{"type":
    "text", "text": ...}]``) joined, anything else not text dropped, lone surrogates (valid in
    JSON, not in UTF-8) replaced."""
    if isinstance(value, list):
        value = " ".join(
            part.get("text", "") if isinstance(part, dict) else part for part in value if isinstance(part, (dict, str))
        )
    if not isinstance(value, str):
        return ""
    return value.encode("utf-8", errors="replace").decode("utf-8")


def window_records(settings: Settings, window: dict, s3_client=None) -> tuple[list[drift.TrafficRecord], dict]:
    """The production calls captured in the window, and what the read found (files, skipped lines)."""

    scan = read_capture(
        settings.serving.capture_uri,
        window["endpoint"],
        start=datetime.fromisoformat(window["start"]),
        end=datetime.fromisoformat(window["end"]),
        s3_client=s3_client,
    )
    calls = [r for r in scan.records if not r.shadow]
    variants = sorted({r.variant for r in calls})
    info = {"files": scan.files, "skipped": scan.skipped[:20], "skipped_count": len(scan.skipped), "variants": variants}
    return [traffic_record(r) for r in calls], info


# -- analysis and report -----------------------------------------------------------------------


def report_folder(settings: Settings, window: dict) -> str:
    return storage.join(settings.store_uri, "drift", window["key"])


def analyze_window(
    settings: Settings,
    window: dict,
    champion: dict,
    policy: drift.DriftPolicy,
    storage_options: dict | None = None,
    embed: drift.Embed | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every check of the window against the champion's baseline; the report's files go to the
    store. Returns the report (JSON-ready) with where its files are and their digest."""
    profile = load_baseline(champion["baseline_uri"], storage_options)
    records, info = window_records(settings, window, s3_client=(storage_options or {}).get("client"))
    log(f"{len(records)} calls captured on {window['endpoint']} in [{window['start']}, {window['end']})")
    for line in info["skipped"]:
        log(f"skipped: {line}")
    embedded: list = []
    base_embed = embed or make_embedder(settings)  # loads the encoder on first use only

    def keeping(texts: list[str]):
        vectors = base_embed(texts)
        embedded.append(vectors)
        return vectors

    report = drift.analyze(profile, records, policy, keeping, drift.seed_for(window["key"]))
    content = {
        "window": window,
        "champion": champion,
        "baseline": profile.summary(),
        "policy": policy.model_dump(),
        "capture": info,
        "report": report.to_dict(),
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    folder = report_folder(settings, window)
    plots = _plots(profile, records, report, embedded[0] if embedded else None)
    files = {
        "report.json": json.dumps({**content, "sha256": digest}, indent=2, default=str).encode(),
        "report.md": markdown_report(content).encode(),
        "report.html": html_report(content, plots).encode(),
        **{f"plots/{name}": png for name, png in plots.items()},
    }
    for name, payload in files.items():
        storage.write_bytes(storage.join(folder, name), payload, storage_options)
    return {
        "verdict": report.verdict,
        "reasons": report.reasons,
        "records": report.records,
        "answered": report.answered,
        "metrics": report.metrics(),
        "checks": [asdict(c) for c in report.checks],
        "folder": folder,
        "files": sorted(files),
        "sha256": digest,
    }


def report_from(analysis: dict) -> drift.DriftReport:
    checks = [drift.CheckResult(**c) for c in analysis["checks"]]
    return drift.DriftReport(
        analysis["verdict"], analysis["reasons"], analysis["records"], analysis["answered"], checks
    )


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"


_MARK = {"ok": "ok", "breach": "BREACH", "info": "info", "no_verdict": "no verdict"}


def markdown_report(content: dict) -> str:
    report, window, champion = content["report"], content["window"], content["champion"]
    lines = [
        f"# Drift report: {window['endpoint']}",
        "",
        f"- window: {window['start']} to {window['end']}",
        f"- champion: {champion['model_name']} version {champion['version']} "
        f"(trained on dataset {champion['dataset_version'][:12]})",
        f"- calls: {report['records']} ({report['answered']} answered); "
        f"capture files read: {content['capture']['files']}",
        f"- **verdict: {report['verdict']}**",
        "",
        *[f"  - {reason}" for reason in report["reasons"]],
        "",
    ]
    if report["checks"]:
        lines += ["| check | status | value | limit | retrains | detail |", "|---|---|---|---|---|---|"]
        for c in report["checks"]:
            value, limit = _number(c["value"]), _number(c["threshold"])
            retrains = "yes" if c["retrain"] else "no"
            lines.append(f"| {c['name']} | {_MARK[c['status']]} | {value} | {limit} | {retrains} | {c['summary']} |")
    examples = _examples(report)
    if examples:
        lines += ["", "Prompts least like the training data (cosine similarity to the nearest training prompt):", ""]
        lines += [f"- {e['nearest_similarity']:.2f}: {_code_span(e['prompt'])}" for e in examples]
    return "\n".join(lines) + "\n"


def _code_span(text: str) -> str:
    """``text`` as inline code whatever it holds (backticks, newlines, Markdown or HTML)."""
    text = " ".join(text.split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def _examples(report: dict) -> list[dict]:
    embedding = next((c for c in report["checks"] if c["name"] == "embedding"), None)
    return (embedding or {}).get("figures", {}).get("least_like_training", [])


def html_report(content: dict, plots: dict[str, bytes]) -> str:
    report, window, champion = content["report"], content["window"], content["champion"]
    colour = {"drift": "#b00020", "alert": "#b26a00", "ok": "#1b5e20", "no_verdict": "#555"}[report["verdict"]]
    rows = "".join(
        "<tr class='{cls}'><td>{name}</td><td>{status}</td><td>{value}</td><td>{limit}</td><td>{retrains}</td>"
        "<td>{summary}</td></tr>".format(
            cls=c["status"],
            name=html.escape(c["name"]),
            status=_MARK[c["status"]],
            value=_number(c["value"]),
            limit=_number(c["threshold"]),
            retrains="yes" if c["retrain"] else "no",
            summary=html.escape(c["summary"]),
        )
        for c in report["checks"]
    )
    images = "".join(
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in plots.items()
    )
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report["reasons"])
    examples = "".join(
        f"<li>{e['nearest_similarity']:.2f}: <code>{html.escape(e['prompt'])}</code></li>" for e in _examples(report)
    )
    if examples:
        examples = (
            "<h3>Prompts least like the training data</h3>"
            f"<p>cosine similarity to the nearest training prompt</p><ul>{examples}</ul>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift report {html.escape(window["key"])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}tr.breach{{background:#fde7e9}}figure{{display:inline-block;margin:8px}}
img{{max-width:520px}}</style></head><body>
<h1>Drift report: {html.escape(window["endpoint"])}</h1>
<p>Window {html.escape(window["start"])} to {html.escape(window["end"])}.
Champion {html.escape(champion["model_name"])} version {html.escape(champion["version"])},
baseline from dataset {html.escape(champion["dataset_version"][:12])}.
{report["records"]} calls, {report["answered"]} answered; capture files read: {content["capture"]["files"]}.</p>
<h2 style="color:{colour}">Verdict: {report["verdict"]}</h2><ul>{reasons}</ul>
<table><tr><th>check</th><th>status</th><th>value</th><th>limit</th><th>retrains</th><th>detail</th></tr>{rows}</table>
{examples}
{images}
</body></html>
"""


def _plots(profile: drift.BaselineProfile, records, report: drift.DriftReport, vectors) -> dict[str, bytes]:
    if report.verdict == drift.NO_VERDICT:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def png(fig) -> bytes:
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        return out.getvalue()

    plots = {}
    edges = profile.prompt_length.edges
    labels = [f"≤{edges[0]:.0f}"] + [f"{a:.0f}-{b:.0f}" for a, b in itertools.pairwise(edges)]
    labels.append(f">{edges[-1]:.0f}")
    window_shares = drift.binned([len(r.prompt) for r in records if r.prompt], edges)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, profile.prompt_length.shares, 0.4, label="training")
    ax.bar(x + 0.2, window_shares, 0.4, label="window")
    ax.set_xticks(x, labels, rotation=45, fontsize=7)
    ax.set_ylabel("share of prompts")
    ax.set_title("Prompt length (characters), by training decile")
    ax.legend()
    plots["prompt_length.png"] = png(fig)

    if vectors is not None and len(vectors):
        pooled = np.concatenate([profile.embeddings, vectors]).astype(np.float64)
        centred = pooled - pooled.mean(0)
        _, _, components = np.linalg.svd(centred, full_matrices=False)
        projected = centred @ components[:2].T
        n = len(profile.embeddings)
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(projected[:n, 0], projected[:n, 1], s=6, alpha=0.4, label="training sample")
        ax.scatter(projected[n:, 0], projected[n:, 1], s=6, alpha=0.6, label="window")
        ax.set_title("Prompt embeddings (first two principal components)")
        ax.legend()
        plots["embeddings.png"] = png(fig)
    return plots


# -- MLflow ------------------------------------------------------------------------------------


def _experiment(settings: Settings, mlflow_client) -> str:
    return ensure_experiment(mlflow_client, settings.monitoring.experiment, settings.mlflow.artifact_uri)


def record_report(
    settings: Settings,
    window: dict,
    champion: dict,
    analysis: dict,
    policy: drift.DriftPolicy,
    lineage: dict,
    storage_options: dict | None = None,
) -> dict:
    """One MLflow run per window (metrics, policy, the report's files), linked from the
    champion's version. The same report again changes nothing."""
    import tempfile
    from pathlib import Path

    mlflow_client = client(settings.mlflow.tracking_uri)
    experiment_id = _experiment(settings, mlflow_client)
    run = find_run(mlflow_client, experiment_id, f"drift/{window['key']}")
    if (
        run is not None
        and run.info.status == "FINISHED"
        and run.data.tags.get("drift.report_sha256") == analysis["sha256"]
    ):
        run_id = run.info.run_id
        changed = False
    else:
        if run is None:
            start = datetime.fromisoformat(window["start"])
            run = mlflow_client.create_run(
                experiment_id,
                run_name=f"drift-{window['endpoint']}-{start:%Y%m%dT%H%M}",
                tags={RUN_KEY: f"drift/{window['key']}", "llmops.kind": "drift"},
            )
        run_id = run.info.run_id
        tags = {
            "drift.endpoint": window["endpoint"],
            "drift.window_start": window["start"],
            "drift.window_end": window["end"],
            "drift.verdict": analysis["verdict"],
            "drift.reasons": "; ".join(analysis["reasons"])[:5000],
            "model_name": champion["model_name"],
            "model_version": champion["version"],
            "dataset.version": champion["dataset_version"],
            BASELINE_TAG: champion["baseline_uri"],
            "airflow.dag_id": lineage.get("dag_id", ""),
            "airflow.run_id": lineage.get("run_id", ""),
        }
        import mlflow

        step = int(datetime.fromisoformat(window["start"]).timestamp())
        mlflow_client.log_batch(
            run_id,
            metrics=[metric_entity(k, v, step) for k, v in sorted(analysis["metrics"].items())],
            params=[]
            if run.data.params
            else [mlflow.entities.Param(k, json.dumps(v)[:6000]) for k, v in policy.model_dump().items()],
            tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()],
        )
        with tempfile.TemporaryDirectory(prefix="llmops-drift-") as tmp:
            for name in analysis["files"]:
                target = Path(tmp) / "drift" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(storage.join(analysis["folder"], name), storage_options))
            mlflow_client.log_artifacts(run_id, str(Path(tmp) / "drift"), "drift")
        # The digest goes last: a run that has it holds the whole report.
        mlflow_client.set_tag(run_id, "drift.report_sha256", analysis["sha256"])
        mlflow_client.set_terminated(run_id, "FINISHED")
        changed = True
    url = report_url(settings, experiment_id, run_id, "drift/report.html")
    _link_version(mlflow_client, champion, window, analysis["verdict"], run_id, url)
    return {"run_id": run_id, "experiment_id": experiment_id, "report_url": url, "changed": changed}


def _link_version(mlflow_client, champion: dict, window: dict, verdict: str, run_id: str, url: str | None) -> None:
    """The version's ``drift.last_*`` tags follow the newest window analysed (an older window
    re-analysed later does not move them back)."""
    version = mlflow_client.get_model_version(champion["model_name"], champion["version"])
    if version.tags.get("drift.last_window_end", "") > window["end"]:
        return
    wanted = {
        "drift.last_window_end": window["end"],
        "drift.last_verdict": verdict,
        "drift.last_run_id": run_id,
        **({"drift.last_report_url": url} if url else {}),
    }
    for key, value in wanted.items():
        if version.tags.get(key) != value:
            mlflow_client.set_model_version_tag(champion["model_name"], champion["version"], key, value)


def last_retrain_request(settings: Settings, window: dict) -> datetime | None:
    """When retraining was last asked for on this endpoint by another window (wall clock)."""

    mlflow_client = client(settings.mlflow.tracking_uri)
    experiment_id = _experiment(settings, mlflow_client)
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{REQUESTED_TAG}` = 'true' and tags.`drift.endpoint` = '{window['endpoint']}'",
        max_results=500,
    )
    times = [
        # A request marked before requests carried their time: the end of its window is close.
        datetime.fromisoformat(r.data.tags.get(REQUESTED_AT_TAG) or r.data.tags["drift.window_end"])
        for r in runs
        if r.data.tags.get("llmops.run_key") != f"drift/{window['key']}"
        and (r.data.tags.get(REQUESTED_AT_TAG) or r.data.tags.get("drift.window_end"))
    ]
    return max(times, default=None)


def finetune_run_id(window: dict) -> str:
    """The ``llm_finetune`` run a window asks for: one per window, whatever retries happen."""
    start, end = datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"])
    return f"drift__{window['endpoint']}__{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}"


def decide(
    settings: Settings,
    window: dict,
    champion: dict,
    analysis: dict,
    recorded: dict,
    policy,
    now: datetime | None = None,
) -> dict:
    """Whether this window asks ``llm_finetune`` to retrain, and the conf it sends. A request is
    marked on the window's run before it is sent, so the cooldown sees it even if sending fails."""

    subject = f"{window['endpoint']} (champion version {champion['version']}) in [{window['start']}, {window['end']})"
    now = now or datetime.now(UTC)
    mlflow_client = client(settings.mlflow.tracking_uri)
    own = mlflow_client.get_run(recorded["run_id"]).data.tags.get(REQUESTED_AT_TAG)
    decision = drift.decide_retraining(
        report_from(analysis), policy, now, last_retrain_request(settings, window), subject
    )
    result = {"trigger": decision.trigger, "reason": decision.reason}
    if decision.trigger:
        run_id = finetune_run_id(window)
        marks = {REQUESTED_TAG: "true", REQUESTED_AT_TAG: own or now.isoformat(), "drift.retrain_dag_run_id": run_id}
        for key, value in marks.items():  # a re-run of this window keeps its first request's time
            mlflow_client.set_tag(recorded["run_id"], key, value)
        reason = decision.reason if len(decision.reason) <= 1500 else decision.reason[:1497] + "..."
        result.update(
            run_id=run_id,
            conf={"reason": reason, "drift_run_id": recorded["run_id"]},
        )
    return result
