"""Great Expectations (1.x) validation of a curated dataset before it is published.

The suite lives in ``include/expectations/<suite>.json``; each expectation's ``meta.defect``
says in plain words what a failure means. Validation runs in a throw-away file-backed GX
context so it can render Data Docs; the result JSON and the Data Docs HTML are then copied to
the run's folder in the store, pass or fail. A failure raises ``DataValidationError`` listing
each failed expectation with example values and record ids.

Why not the ``airflow-provider-great-expectations`` operators: release 1.0.0 pins
``structlog<25.5``, which Airflow 3.3 cannot install, and its DataFrame operator builds the
DataFrame when the DAG is parsed. The GX calls below are the ones it makes.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops import storage
from llmops.config import INCLUDE_DIR
from llmops.data.records import DataQualityError

EXPECTATIONS_DIR = INCLUDE_DIR / "expectations"
EXAMPLES = 5


class DataValidationError(DataQualityError):
    """The dataset failed its expectation suite."""

    def __init__(self, message: str, outcome: ValidationOutcome):
        super().__init__(message)
        self.outcome = outcome


@dataclass
class ValidationOutcome:
    success: bool
    suite: str
    evaluated: int
    failed: list[dict] = field(default_factory=list)
    result_uri: str | None = None
    data_docs_uri: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "suite": self.suite,
            "evaluated_expectations": self.evaluated,
            "failed_expectations": len(self.failed),
            "result_uri": self.result_uri,
            "data_docs_uri": self.data_docs_uri,
        }


def load_suite_definition(name: str, directory: Path = EXPECTATIONS_DIR) -> dict:
    path = directory / f"{name}.json"
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = sorted(p.stem for p in directory.glob("*.json"))
        raise DataQualityError(f"expectation suite {name!r} not found at {path} (known: {known})") from None
    except json.JSONDecodeError as exc:
        raise DataQualityError(f"{path} line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(definition.get("expectations"), list) or not definition["expectations"]:
        raise DataQualityError(f"{path}: an expectation suite needs a non-empty 'expectations' list")
    return definition


def _describe_failure(result: Any) -> dict:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",)}
    detail = result.result or {}
    ids = [row.get("id") for row in detail.get("partial_unexpected_index_list") or [] if isinstance(row, dict)]
    return {
        "expectation": config.type,
        "kwargs": {k: v for k, v in kwargs.items() if k != "regex_list"},
        "defect": (config.meta or {}).get("defect", ""),
        "unexpected_count": detail.get("unexpected_count"),
        "unexpected_percent": detail.get("unexpected_percent"),
        "examples": [_short(v) for v in (detail.get("partial_unexpected_list") or [])[:EXAMPLES]],
        "example_ids": ids[:EXAMPLES],
        "observed_value": detail.get("observed_value"),
        # GX builds this list from a set: sorted, the same defect always reads the same.
        "missing": sorted(
            detail.get("partial_missing_list") or detail.get("details", {}).get("missing") or [], key=str
        ),
    }


def _short(value: Any, limit: int = 80) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    return value


def format_failures(outcome: ValidationOutcome, records: int) -> str:
    lines = [
        f"Great Expectations suite {outcome.suite!r} failed {len(outcome.failed)} of {outcome.evaluated} "
        f"expectations on {records} records:"
    ]
    for failure in outcome.failed:
        column = failure["kwargs"].get("column")
        target = f"(column={column})" if column else ""
        head = f"  - {failure['expectation']}{target}"
        if failure["defect"]:
            head += f" [{failure['defect']}]"
        if failure["unexpected_count"] is not None:
            head += f": {failure['unexpected_count']} unexpected ({failure['unexpected_percent']:.1f}%)"
        elif failure["observed_value"] is not None:
            head += f": observed {failure['observed_value']!r}"
        if failure["missing"]:
            head += f": missing {failure['missing']!r}"
        lines.append(head)
        if failure["examples"]:
            lines.append(f"      example values: {failure['examples']}")
        if failure["example_ids"]:
            lines.append(f"      record ids: {failure['example_ids']}")
    lines.append(f"Validation result: {outcome.result_uri}")
    lines.append(f"Data Docs: {outcome.data_docs_uri}")
    return "\n".join(lines)


def validate_records(
    frame: Any,
    suite_name: str,
    parameters: dict[str, Any],
    output_uri: str,
    storage_options: dict | None = None,
) -> ValidationOutcome:
    """Validate a DataFrame against a suite; save result and Data Docs under ``output_uri``.

    Returns the outcome on success, raises ``DataValidationError`` on failure (after saving)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # GX logs every datasource save at INFO; the task log should show the verdict, not that.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    definition = load_suite_definition(suite_name)
    with tempfile.TemporaryDirectory(prefix="llmops-gx-") as project_dir:
        context = gx.get_context(mode="file", project_root_dir=project_dir)
        context.variables.progress_bars = {"globally": False}
        batch = (
            context.data_sources.add_pandas("curated")
            .add_dataframe_asset("records")
            .add_batch_definition_whole_dataframe("all_splits")
        )
        try:
            expectations = [
                ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta")).to_domain_obj()
                for e in definition["expectations"]
            ]
        except Exception as exc:
            raise DataQualityError(f"expectation suite {suite_name!r} is invalid: {exc}") from exc
        suite = context.suites.add(
            gx.ExpectationSuite(name=suite_name, expectations=expectations, meta=definition.get("meta"))
        )
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite_name}-validation", data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{suite_name}-checkpoint",
                validation_definitions=[validation],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
                result_format={
                    "result_format": "SUMMARY",
                    "partial_unexpected_count": EXAMPLES,
                    "unexpected_index_column_names": ["id"] if "id" in frame.columns else [],
                },
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters)
        result = next(iter(run.run_results.values()))

        result_uri = storage.join(output_uri, "result.json")
        docs_uri = storage.join(output_uri, "data_docs")
        storage.write_json(result_uri, result.to_json_dict(), storage_options)
        site = Path(project_dir) / "gx" / "uncommitted" / "data_docs" / "local_site"
        # The site describes this validation alone: an earlier one's pages (a re-run) go first.
        storage.delete(docs_uri, recursive=True, storage_options=storage_options)
        storage.upload_dir(str(site), docs_uri, storage_options)

    outcome = ValidationOutcome(
        success=bool(result.success),
        suite=suite_name,
        evaluated=len(result.results),
        failed=[_describe_failure(r) for r in result.results if not r.success],
        result_uri=result_uri,
        data_docs_uri=storage.join(docs_uri, "index.html"),
    )
    if not outcome.success:
        raise DataValidationError(format_failures(outcome, len(frame)), outcome)
    return outcome
