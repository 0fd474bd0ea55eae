"""The typed values ``llm_finetune``'s tasks hand each other (``llmops.contracts``): a real value
round-trips to the same JSON, and a bad one is refused with the field that is wrong."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from llmops import storage
from llmops.comparison import Comparison
from llmops.config import ConfigError
from llmops.contracts import (
    DatasetManifest,
    EvaluationResult,
    GateDecision,
    GateOutcome,
    RegisteredCandidate,
    TrainingData,
)
from llmops.data.records import SPLITS
from llmops.finetune import LATEST, select_dataset
from llmops.gate import Check, Decision
from llmops.tracking import RegisteredVersion
from tests.datagen import dataset_manifest, good_records, write_jsonl


def toy_manifest(tmp_path) -> dict:
    files = {}
    for split in SPLITS:
        payload = storage.jsonl_bytes([{"id": f"{split}-1", "prompt": "p", "response": "r", "source": "t"}])
        (tmp_path / f"{split}.jsonl").write_bytes(payload)
        files[split] = (storage.to_uri(str(tmp_path / f"{split}.jsonl")), payload)
    return dataset_manifest(files)


def refused_fields(exc: pytest.ExceptionInfo) -> set[str]:
    return {".".join(str(p) for p in error["loc"]) for error in exc.value.errors()}


# --- DatasetManifest ---------------------------------------------------------------------------


@pytest.mark.model  # the curation stage counts tokens with the base model's tokenizer
def test_a_manifest_the_curation_stage_wrote_round_trips_to_the_same_json(settings, tmp_path):
    from llmops.data import stages

    raw = write_jsonl(tmp_path / "raw.jsonl", good_records(60))
    published = stages.curate(settings, settings.data.model_copy(update={"raw_uri": str(raw)}))
    written = storage.read_json(published["manifest_uri"])

    manifest = DatasetManifest.model_validate(written)
    assert json.dumps(manifest.to_dict()) == json.dumps(written), "same fields, same order, same values"
    assert manifest.files.test.uri == storage.join(published["uri"], "test.jsonl")
    assert manifest.counts.train == published["counts"]["train"] and manifest.validation.success is True
    assert manifest.uri is None, "the stored manifest does not say where it is; select_dataset adds that"

    selected = select_dataset(settings, LATEST)
    assert selected == {**written, "uri": published["uri"], "manifest_uri": published["manifest_uri"]}
    assert list(selected) == [*written, "uri", "manifest_uri"]


def test_the_splits_are_the_curation_splits():
    from llmops.contracts import DatasetFiles, SplitCounts

    assert set(DatasetFiles.model_fields) == set(SPLITS) == set(SplitCounts.model_fields)


def test_a_manifest_round_trips_and_reads_as_attributes(tmp_path):
    written = toy_manifest(tmp_path)
    manifest = DatasetManifest.model_validate(written)
    assert manifest.to_dict() == written and list(manifest.to_dict()) == list(written)
    assert DatasetManifest.model_validate(manifest) == manifest
    assert manifest.label == f"python-docs-instruct@{'0' * 12}" and manifest.template == "instruction@1"


@pytest.mark.parametrize("split", SPLITS)
def test_a_manifest_missing_a_split_is_refused_naming_it(tmp_path, split):
    written = toy_manifest(tmp_path)
    del written["files"][split]
    with pytest.raises(ValidationError) as info:
        DatasetManifest.model_validate(written)
    assert refused_fields(info) == {f"files.{split}"}


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("files", "train", "uri"), 3, "files.train.uri"),
        (("files", "validation", "sha256"), None, "files.validation.sha256"),
        (("counts", "test"), "12", "counts.test"),
        (("validation", "success"), "yes", "validation.success"),
        (("version",), 42, "version"),
        (("records", "read"), 1.5, "records.read"),
    ],
)
def test_a_manifest_with_a_wrong_type_is_refused_naming_the_field(tmp_path, path, value, field):
    written = toy_manifest(tmp_path)
    target = written
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError) as info:
        DatasetManifest.model_validate(written)
    assert refused_fields(info) == {field}


def test_the_shapes_the_versioning_writes_are_closed(tmp_path):
    written = toy_manifest(tmp_path)
    written["files"]["train"]["bytes"] = 10
    with pytest.raises(ValidationError) as info:
        DatasetManifest.model_validate(written)
    assert refused_fields(info) == {"files.train.bytes"}


def test_a_manifest_from_before_the_drop_reports_or_from_another_writer_is_read_as_it_is(tmp_path):
    written = toy_manifest(tmp_path)
    del written["records"], written["dropped"], written["stages"]
    written["parent_version"] = "f" * 64  # a field this release does not know
    manifest = DatasetManifest.model_validate(written)
    assert manifest.records is None and manifest.template == ""
    assert manifest.to_dict() == written, "nothing added, nothing lost"


def test_a_manifest_without_validation_results_is_no_dataset_to_train_on(tmp_path):
    written = toy_manifest(tmp_path)
    del written["validation"]["data_docs_uri"]
    with pytest.raises(ValidationError) as info:
        DatasetManifest.model_validate(written)
    assert refused_fields(info) == {"validation.data_docs_uri"}


def test_select_dataset_refuses_a_stored_manifest_of_the_wrong_shape_naming_the_field(settings):
    from llmops.data import versioning

    records = [
        {"id": f"{s}-{i}", "prompt": f"q {s} {i}", "response": "a", "source": "t", "split": s}
        for s in SPLITS
        for i in range(2)
    ]
    result_uri = storage.join(settings.runs_uri(), "validation", "result.json")
    storage.write_json(result_uri, {"success": True})
    # Validated, but its validation summary lacks the suite's figures.
    fields = {"validation": {"success": True, "result_uri": result_uri, "data_docs_uri": "y"}}
    published = versioning.publish(records, settings.datasets_uri(), settings.data.dataset_name, fields)
    with pytest.raises(ConfigError, match=r"is not a dataset manifest") as info:
        select_dataset(settings, published.version)
    assert "validation.suite: Field required" in str(info.value)
    assert published.manifest_uri in str(info.value)


def test_training_data_is_what_a_dry_run_names_or_any_manifest(tmp_path):
    manifest = DatasetManifest.model_validate(toy_manifest(tmp_path))
    dry_run = {"version": "3f2a9c", "files": {s: {"uri": f"s3://b/d/{s}.jsonl"} for s in ("train", "validation")}}
    assert TrainingData.of(dry_run).files.validation.uri == "s3://b/d/validation.jsonl"
    assert TrainingData.of(manifest).files.train.uri == manifest.files.train.uri
    assert TrainingData.of(manifest.to_dict()).version == manifest.version
    with pytest.raises(ValidationError) as info:
        TrainingData.of({"version": "3f2a9c", "files": {"train": {"uri": "s3://b/d/train.jsonl"}}})
    assert refused_fields(info) == {"files.validation"}


# --- EvaluationResult --------------------------------------------------------------------------

LOCAL_RESULT = {
    "job_name": "llmops-eval-1",
    "backend": "local",
    "predictions_uri": "file:///s/evaluation-jobs/llmops-eval-1/output/predictions.jsonl",
    "summary": {"models": {"base": {"chrf": 10.0}}, "inputs_sha256": "ab" * 32},
    "log_uri": "file:///s/evaluation-jobs/llmops-eval-1/output/evaluation.log",
    "reused": False,
    "items_uri": "file:///s/evaluation-jobs/llmops-eval-1/input/items.jsonl",
    "models": ["base", "candidate"],
    "versions": {"candidate": "2"},
    "cost": {"instance_type": "local", "instance_count": 1, "billable_seconds": 9.0, "usd_per_hour": None},
}
RECORD = {"prompt_refs": ["instruction@1"], "catalog_sha256": "cd" * 32}


def test_what_run_evaluation_returns_and_what_the_dag_adds_round_trip():
    assert EvaluationResult.model_validate(LOCAL_RESULT).to_dict() == LOCAL_RESULT
    merged = {**LOCAL_RESULT, **RECORD}
    result = EvaluationResult.model_validate(merged)
    assert result.to_dict() == merged and list(result.to_dict()) == list(merged)
    assert result.job_arn is None and "job_arn" not in result.to_dict(), "the local backend has no ARN"


def test_a_sagemaker_evaluation_carries_its_arn():
    arn = "arn:aws:sagemaker:us-east-1:123456789012:processing-job/llmops-eval-1"
    result = EvaluationResult.model_validate({**LOCAL_RESULT, "backend": "sagemaker", "job_arn": arn, **RECORD})
    assert result.job_arn == arn and result.to_dict()["job_arn"] == arn


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"predictions_uri": None}, "predictions_uri"),
        ({"versions": {"candidate": 2}}, "versions.candidate"),
        ({"models": "base"}, "models"),
        ({"predicitons_uri": "x"}, "predicitons_uri"),
    ],
)
def test_a_bad_evaluation_result_is_refused_naming_the_field(change, field):
    with pytest.raises(ValidationError) as info:
        EvaluationResult.model_validate({**LOCAL_RESULT, **change})
    assert refused_fields(info) == {field}


# --- GateOutcome -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decision",
    [
        Decision(True, (Check("minimum.chrf", True, "chrf 30 >= 20"), Check("non_regression", True, "-", True))),
        Decision(False, (Check("minimum.chrf", False, "chrf 10 < 20"), Check("improve_on_base.chrf", True, "ok"))),
        Decision(True, ()),
    ],
)
def test_the_gate_decision_is_the_gates_own_shape(decision):
    written = decision.to_dict()
    typed = GateDecision.model_validate(written)
    assert typed.to_dict() == written and typed.promote is decision.promote
    assert typed.reasons == decision.reasons and typed.verdict == decision.verdict
    assert Decision.from_dict(typed.to_dict()) == decision


def test_a_gate_outcome_keeps_its_comparison_as_it_came_nan_included():
    comparison = Comparison("candidate", models={"candidate": {"chrf": math.nan}}, deltas={}, by_set={})
    written = {
        "comparison": comparison.to_dict(),
        "decision": Decision(False, (Check("minimum.chrf", False, "chrf not measured"),)).to_dict(),
        "table": "model chrf",
        "markdown": "| model | chrf |",
        "judge": "local rule-based judge",
    }
    outcome = GateOutcome.model_validate(written)
    assert json.dumps(outcome.to_dict(), sort_keys=True) == json.dumps(written, sort_keys=True)
    assert math.isnan(outcome.to_dict()["comparison"]["models"]["candidate"]["chrf"]), "not turned into None"
    assert outcome.decision.reasons == ["chrf not measured"]
    with pytest.raises(ValidationError) as info:
        GateOutcome.model_validate({**written, "decision": {**written["decision"], "verdict": "maybe"}})
    assert refused_fields(info) == {"decision.verdict"}


# --- RegisteredCandidate -----------------------------------------------------------------------


def test_the_registered_candidate_is_the_version_with_its_metrics_and_artifact():
    version = RegisteredVersion("m", "3", "run-1", "7", "file:///a/model", created=True)
    written = {**version.to_dict(), "metrics": {"eval_loss": 1.5}, "artifact_uri": "file:///j/model.tar.gz"}
    candidate = RegisteredCandidate.model_validate(written)
    assert candidate.to_dict() == written and list(candidate.to_dict()) == list(written)
    with pytest.raises(ValidationError) as info:
        RegisteredCandidate.model_validate({**written, "version": 3})
    assert refused_fields(info) == {"version"}
