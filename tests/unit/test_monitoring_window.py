"""The pure helpers of ``llmops.drift.monitor``: which window a run analyses, the retraining run's id,
and the Markdown / HTML renderings of a report (no MLflow, no store)."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from llmops.config import ConfigError
from llmops.drift.monitor import finetune_run_id, html_report, markdown_report, resolve_window

EP = "python-docs-assistant"
RUN_AFTER = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
AIRFLOW_RUN_ID = re.compile(r"[A-Za-z0-9_.~:+-]+")  # Airflow's default allowed_run_id_pattern


def window(start=None, end=None, interval_start=None, interval_end=None, run_after=RUN_AFTER, hours=1.0) -> dict:
    return resolve_window(EP, start, end, interval_start, interval_end, run_after, hours=hours)


# -- resolve_window ------------------------------------------------------------------------------


def test_explicit_bounds_with_z_suffix():
    w = window("2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z")
    assert w == {
        "endpoint": EP,
        "start": "2024-05-01T10:00:00+00:00",
        "end": "2024-05-01T11:00:00+00:00",
        "key": f"{EP}/20240501T100000Z-20240501T110000Z",
    }


def test_explicit_bounds_with_offsets_are_converted_to_utc():
    w = window(" 2024-05-01T10:00:00+02:00 ", "2024-05-01T06:30:00-03:00")
    assert w["start"] == "2024-05-01T08:00:00+00:00"
    assert w["end"] == "2024-05-01T09:30:00+00:00"
    assert w["key"] == f"{EP}/20240501T080000Z-20240501T093000Z"


def test_naive_bounds_are_read_as_utc():
    w = window("2024-05-01T10:00", "2024-05-01 11:15:30")
    assert w["start"] == "2024-05-01T10:00:00+00:00"
    assert w["end"] == "2024-05-01T11:15:30+00:00"


def test_form_bounds_win_over_the_data_interval():
    interval = (datetime(2024, 4, 1, tzinfo=UTC), datetime(2024, 4, 2, tzinfo=UTC))
    w = window("2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z", *interval)
    assert w["start"] == "2024-05-01T10:00:00+00:00"


def test_only_a_start_ends_at_the_run_time():
    w = window(start="2024-05-01T09:00:00Z")
    assert w["start"] == "2024-05-01T09:00:00+00:00"
    assert w["end"] == RUN_AFTER.isoformat()


@pytest.mark.parametrize("hours", [1.0, 6.0, 0.25])
def test_only_an_end_starts_hours_before_it(hours):
    w = window(end="2024-05-01T11:00:00Z", hours=hours)
    end = datetime(2024, 5, 1, 11, tzinfo=UTC)
    assert w["end"] == end.isoformat()
    assert w["start"] == (end - timedelta(hours=hours)).isoformat()


def test_the_data_interval_is_the_window_without_form_bounds():
    plus2 = timezone(timedelta(hours=2))
    w = window(None, "", datetime(2024, 5, 1, 10, tzinfo=plus2), datetime(2024, 5, 1, 11, tzinfo=plus2))
    assert w["start"] == "2024-05-01T08:00:00+00:00"
    assert w["end"] == "2024-05-01T09:00:00+00:00"
    assert w["key"] == f"{EP}/20240501T080000Z-20240501T090000Z"


@pytest.mark.parametrize(
    "interval",
    [
        (None, None),
        (datetime(2024, 5, 1, 10, tzinfo=UTC), None),
        (None, datetime(2024, 5, 1, 10, tzinfo=UTC)),
        (datetime(2024, 5, 1, 10, tzinfo=UTC), datetime(2024, 5, 1, 10, tzinfo=UTC)),  # a manual run's interval
        (datetime(2024, 5, 1, 11, tzinfo=UTC), datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ],
)
def test_without_a_usable_interval_the_window_is_the_hour_before_the_run(interval):
    w = window(None, None, *interval)
    assert w["end"] == "2024-05-01T12:30:00+00:00"
    assert w["start"] == "2024-05-01T11:30:00+00:00"


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00Z"),
        ("2024-05-01T11:00:00Z", "2024-05-01T10:00:00Z"),
        ("2024-05-01T10:30:00Z", "2024-05-01T12:00:00+02:00"),  # 12:00+02:00 is 10:00 UTC
    ],
)
def test_an_end_not_after_the_start_is_a_config_error(start, end):
    with pytest.raises(ConfigError, match=r"window_end \(.*\) must come after window_start"):
        window(start, end)


def test_a_start_after_the_run_time_is_a_config_error():
    with pytest.raises(ConfigError, match="window_end"):
        window(start="2024-05-02T00:00:00Z")


def test_offsets_are_compared_in_utc():
    # 12:00+02:00 is 10:00 UTC, before 10:30 UTC: a valid half hour, though "12:00" > "10:30" as text.
    w = window("2024-05-01T12:00:00+02:00", "2024-05-01T10:30:00Z")
    assert (w["start"], w["end"]) == ("2024-05-01T10:00:00+00:00", "2024-05-01T10:30:00+00:00")


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        ("yesterday", "2024-05-01T10:00:00Z", "window_start"),
        ("2024-05-01T09:00:00Z", "2024-13-01T10:00:00Z", "window_end"),
        (None, "10 o'clock", "window_end"),
        ("   ", None, "window_start"),
    ],
)
def test_a_malformed_bound_is_a_config_error_naming_the_field(start, end, field):
    with pytest.raises(ConfigError, match=rf"^{field}: .* is not an ISO-8601 date and time"):
        window(start, end)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_the_key_is_stable_and_names_the_endpoint():
    interval = (datetime(2024, 5, 1, 10, tzinfo=UTC), datetime(2024, 5, 1, 11, tzinfo=UTC))
    first = window(None, None, *interval)
    assert window(None, None, *interval, run_after=RUN_AFTER + timedelta(days=3)) == first
    assert first["key"].startswith(f"{EP}/")
    assert first["key"] == window("2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z")["key"]
    assert resolve_window("other-endpoint", None, None, *interval, RUN_AFTER)["key"] != first["key"]
    assert window(None, None, interval[0], interval[1] + timedelta(minutes=1))["key"] != first["key"]


# -- finetune_run_id -----------------------------------------------------------------------------


def test_finetune_run_id_is_a_valid_airflow_run_id_stable_per_window():
    w = window("2024-05-01T10:00:00+02:00", "2024-05-01T09:00:00Z")
    run_id = finetune_run_id(w)
    assert run_id == f"drift__{EP}__20240501T080000Z-20240501T090000Z"
    assert AIRFLOW_RUN_ID.fullmatch(run_id)
    assert finetune_run_id(dict(w)) == run_id
    assert finetune_run_id(window("2024-05-01T09:00:00Z", "2024-05-01T10:00:00Z")) != run_id
    # Two windows that start together but end apart are two requests.
    assert finetune_run_id(window("2024-05-01T08:00:00Z", "2024-05-01T08:30:00Z")) != run_id
    assert len(run_id) <= 250  # Airflow's run_id column


# -- the rendered reports ------------------------------------------------------------------------

EVIL = "<script>alert('x')</script>"


def content(verdict: str = "drift", checks: list[dict] | None = None, reasons: list[str] | None = None) -> dict:
    w = window("2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z")
    if checks is None:
        checks = [
            {
                "name": "embedding",
                "status": "breach",
                "value": 0.41234,
                "threshold": 0.1,
                "retrain": True,
                "summary": f"prompt embeddings moved: {EVIL}",
                "figures": {
                    "p_value": 0.005,
                    "least_like_training": [{"prompt": f"tell me {EVIL} about gardens", "nearest_similarity": 0.12}],
                },
            },
            {
                "name": "error_rate",
                "status": "ok",
                "value": 0.0,
                "threshold": 0.05,
                "retrain": False,
                "summary": "0 of 80 calls failed (0.0%; limit 5%)",
                "figures": {},
            },
            {
                "name": "response_length",
                "status": "info",
                "value": None,
                "threshold": None,
                "retrain": False,
                "summary": "answer length PSI (reported only)",
                "figures": {},
            },
        ]
    return {
        "window": w,
        "champion": {
            "model_name": "python-assistant",
            "version": "7",
            "dataset_version": "0123456789abcdef0123",
            "baseline_uri": "s3://store/baselines/x",
        },
        "baseline": {"records": 240},
        "policy": {"min_records": 50},
        "capture": {"files": 3, "skipped": [], "skipped_count": 0, "variants": ["champion"]},
        "report": {
            "verdict": verdict,
            "reasons": reasons if reasons is not None else [c["summary"] for c in checks if c["status"] == "breach"],
            "records": 80,
            "answered": 78,
            "checks": checks,
        },
    }


def test_markdown_report():
    text = markdown_report(content())
    assert text.startswith(f"# Drift report: {EP}\n")
    assert "- window: 2024-05-01T10:00:00+00:00 to 2024-05-01T11:00:00+00:00" in text
    assert "python-assistant version 7 (trained on dataset 0123456789ab)" in text
    assert "0123456789abc" not in text
    assert "- calls: 80 (78 answered); capture files read: 3" in text
    assert "- **verdict: drift**" in text
    assert "| embedding | BREACH | 0.4123 | 0.1 | yes |" in text
    assert "| error_rate | ok | 0 | 0.05 | no |" in text
    assert "| response_length | info |  |  | no | answer length PSI (reported only) |" in text
    assert text.endswith("\n")


def test_markdown_report_without_checks_has_no_table():
    text = markdown_report(content("no_verdict", checks=[], reasons=["3 calls in the window; a verdict needs 50"]))
    assert "- **verdict: no_verdict**" in text
    assert "  - 3 calls in the window; a verdict needs 50" in text
    assert "| check |" not in text


def test_html_report_escapes_and_shows_the_verdict():
    png = b"\x89PNG\r\n\x1a\nfake"
    page = html_report(content(), {"prompt_length.png": png})
    assert page.startswith("<!doctype html>")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert '<h2 style="color:#b00020">Verdict: drift</h2>' in page
    assert "<tr class='breach'><td>embedding</td><td>BREACH</td><td>0.4123</td><td>0.1</td><td>yes</td>" in page
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    assert "<figcaption>prompt_length.png</figcaption>" in page
    assert f"<title>Drift report {EP}/20240501T100000Z-20240501T110000Z</title>" in page
    assert "78 answered; capture files read: 3." in page


@pytest.mark.parametrize(
    ("verdict", "colour"), [("ok", "#1b5e20"), ("alert", "#b26a00"), ("no_verdict", "#555"), ("drift", "#b00020")]
)
def test_html_report_colours_each_verdict(verdict, colour):
    page = html_report(content(verdict, checks=[], reasons=[f"why: {EVIL}"]), {})
    assert f'<h2 style="color:{colour}">Verdict: {verdict}</h2>' in page
    assert "<li>why: &lt;script&gt;" in page
    assert "<figure>" not in page


# -- captured records as traffic -----------------------------------------------------------------


def _captured(request: dict, response, status: int = 200):
    from datetime import datetime

    from serving.capture import CapturedRecord

    return CapturedRecord(
        endpoint=EP,
        variant="v1",
        event_id="e1",
        inference_time=datetime(2024, 5, 1, tzinfo=UTC),
        request=json.dumps(request),
        request_type="application/json",
        response=None if response is None else json.dumps(response),
        response_type="application/json",
        latency_ms=12.5,
        status_code=status,
    )


def test_a_captured_chat_becomes_its_last_user_turn_and_the_answer():
    from llmops.drift.monitor import traffic_record

    chat = {"inputs": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a set?"}]}
    record = traffic_record(_captured(chat, {"generated_text": "An unordered collection."}))
    assert (record.prompt, record.response, record.status, record.latency_ms) == (
        "What is a set?",
        "An unordered collection.",
        200,
        12.5,
    )
    assert record.answered


def test_a_hugging_face_container_answer_and_a_failed_call_are_read():
    from llmops.drift.monitor import traffic_record

    tgi = traffic_record(_captured({"inputs": "What is a set?"}, [{"generated_text": "A collection."}]))
    assert (tgi.prompt, tgi.response) == ("What is a set?", "A collection.")
    failed = traffic_record(_captured({"inputs": "What is a set?"}, {"error": "boom"}, status=424))
    assert failed.response is None and failed.status == 424 and not failed.answered


def test_both_reports_show_the_prompts_least_like_the_training_data_escaped_in_html():
    page = html_report(content(), {})
    assert "Prompts least like the training data" in page
    assert "0.12: <code>tell me &lt;script&gt;" in page
    assert "<script>" not in page
    text = markdown_report(content())
    assert "- 0.12: ` tell me <script>alert('x')</script> about gardens `" in text  # inline code, not markup


def test_a_captured_prompt_cannot_escape_its_markdown_code_span():
    from llmops.drift.monitor import _code_span

    assert _code_span("use `x` here\n![i](http://e/x.png)") == "`` use `x` here ![i](http://e/x.png) ``"


def test_chat_content_in_parts_and_lone_surrogates_become_clean_text():
    from llmops.drift.monitor import traffic_record

    parts = {
        "inputs": [
            {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "a set?"}]}
        ]
    }
    assert traffic_record(_captured(parts, {"generated_text": "ok"})).prompt == "What is a set?"
    odd = traffic_record(_captured({"inputs": "broken \ud83d emoji"}, {"generated_text": "x \udc00"}))
    assert odd.prompt == "broken ? emoji" and odd.response == "x ?"
    odd.prompt.encode("utf-8")  # a report can be written
    weird = traffic_record(_captured({"inputs": [{"role": "user", "content": 42}]}, {"generated_text": "ok"}))
    assert weird.prompt == ""


def test_a_capture_delay_moves_scheduled_windows_back_but_not_the_forms():
    start, end = datetime(2024, 5, 1, 10, tzinfo=UTC), datetime(2024, 5, 1, 11, tzinfo=UTC)
    scheduled = resolve_window(EP, None, None, start, end, RUN_AFTER, delay_minutes=15)
    assert (scheduled["start"], scheduled["end"]) == ("2024-05-01T09:45:00+00:00", "2024-05-01T10:45:00+00:00")
    following = resolve_window(EP, None, None, end, end + timedelta(hours=1), RUN_AFTER, delay_minutes=15)
    assert following["start"] == scheduled["end"]  # back to back: no call falls between two windows
    manual = resolve_window(EP, None, None, None, None, RUN_AFTER, delay_minutes=15)
    assert manual["end"] == "2024-05-01T12:15:00+00:00"
    named = resolve_window(EP, "2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z", start, end, RUN_AFTER, delay_minutes=15)
    assert (named["start"], named["end"]) == ("2024-05-01T10:00:00+00:00", "2024-05-01T11:00:00+00:00")
