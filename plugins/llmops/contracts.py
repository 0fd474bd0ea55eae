"""What tasks and backends hand each other, as small typed values that import nothing heavy.

The lowest layer of the library: the decision modules, the backends and the stages all import
it, and it imports none of them.

The pydantic models here are what ``llm_finetune``'s tasks pass on: a curated dataset version's
manifest, an evaluation's result and the gate's outcome. XCom still carries plain dicts (each
model's ``to_dict()``), and every function that takes one validates it at its entry
(``X.model_validate(value)``: a model or the dict XCom gave back), so a bad value fails there with
pydantic's error naming the field. Fields are declared in the order the producers write them (a
manifest's as ``manifest.json`` holds them), so a value's JSON is the same bytes after a round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class VariantWindow:
    """What one variant did in a time window (from the gateway's or CloudWatch's metrics)."""

    invocations: int
    errors: int
    p95_ms: float | None = None
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.invocations if self.invocations else 0.0


class Contract(BaseModel):
    """A value one task hands another: frozen, strict (JSON types as they are, no coercion), and
    closed to fields nobody declared."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_dict(self) -> dict[str, Any]:
        """The value as XCom carries it: the fields it was given (an optional field left out stays
        out), their values as they came. Not ``mode="json"``: that would turn a NaN in a free-form
        field (a metric of an empty comparison) into None, and the value and its digest would change."""
        return self.model_dump(exclude_unset=True)


# -- a curated dataset version (``llmops.data.versioning`` writes it, ``llmops.data.stages`` fills it)
#
# ``manifest.json`` is written with sorted keys (``storage.write_json``), and what a reader gets is
# that order; so the fields are declared in it, and a manifest read back dumps to the same JSON.


class DatasetFile(Contract):
    sha256: str
    uri: str


class DatasetFiles(Contract):
    """One file per split (``llmops.data.records.SPLITS``); a manifest without one is no version."""

    test: DatasetFile
    train: DatasetFile
    validation: DatasetFile


class SplitCounts(Contract):
    test: int
    train: int
    validation: int


class ValidationSummary(Contract):
    """The expectation suite's verdict (``llmops.data.validation.ValidationOutcome.summary``)."""

    data_docs_uri: str
    evaluated_expectations: int
    failed_expectations: int
    result_uri: str
    success: bool
    suite: str


class RecordCounts(Contract):
    dropped: int
    published: int
    read: int


class DropReport(Contract):
    by_reason: dict[str, int]
    records: list[dict[str, Any]]


class DatasetManifest(Contract):
    """A curated dataset version's ``manifest.json``; ``select_dataset`` adds where it lives
    (``uri``, ``manifest_uri``, after the stored fields).

    Open to fields it does not declare (``extra="allow"``; they dump after the declared ones), and
    the curation stage's own fields are optional, for two reasons: a version is never rewritten, so
    a manifest an older release wrote stays as it was (those before the drop reports carry no
    ``records`` or ``dropped``), and ``versioning.publish`` takes its caller's fields as they come.
    What ``llm_finetune`` reads (what and where the files are, the validation verdict) is required
    and typed; the shapes ``versioning`` itself writes (files, counts) are closed.
    """

    model_config = ConfigDict(extra="allow")

    config: dict[str, Any] | None = None  # the DataConfig it was curated with
    content_sha256: str
    counts: SplitCounts
    created_at: str  # as written (ISO 8601): a datetime would not print back the same
    dropped: DropReport | None = None
    files: DatasetFiles
    lineage: dict[str, Any] | None = None
    name: str
    records: RecordCounts | None = None
    source_uris: list[str] | None = None
    stages: dict[str, dict[str, Any]] | None = None  # each curation stage's statistics
    validation: ValidationSummary
    version: str
    uri: str | None = None
    manifest_uri: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version[:12]}"

    @property
    def template(self) -> str:
        """The prompt template its records were formatted with (``name@version``), or ""."""
        return str(((self.stages or {}).get("format") or {}).get("template", ""))


class FileRef(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    uri: str


class TrainingFiles(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    train: FileRef
    validation: FileRef


class TrainingData(BaseModel):
    """What a training job reads of a dataset version: its version and its train and validation
    files. Every ``DatasetManifest`` is one; so is what a dry run names without reading the store
    (``devtools.aws``), which is why the request builders take this and not the whole manifest."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    version: str
    files: TrainingFiles

    @classmethod
    def of(cls, value: TrainingData | DatasetManifest | dict) -> TrainingData:
        if isinstance(value, DatasetManifest):
            value = value.to_dict()
        return cls.model_validate(value)


# -- an evaluation and the gate's outcome -------------------------------------------------------


class EvaluationResult(Contract):
    """An evaluation job's outputs (either backend, in one shape) and what the record needs about
    it: the models answered, their registry versions and, once ``evaluate_models`` has added
    them, the prompt versions and the evaluation catalog's hash."""

    job_name: str
    backend: str
    predictions_uri: str
    summary: dict[str, Any]
    log_uri: str
    reused: bool = False
    job_arn: str | None = None  # SageMaker's; the local backend has none
    items_uri: str
    models: list[str]  # labels: base, candidate and (when there is one) champion
    versions: dict[str, str]  # label -> registered version
    cost: dict[str, Any]  # llmops.costs.estimate_cost's figures
    prompt_refs: list[str] | None = None
    catalog_sha256: str | None = None


class GateCheck(Contract):
    """``llmops.gate.Check``, as ``Decision.to_dict`` writes it."""

    name: str
    passed: bool
    detail: str
    skipped: bool = False


class GateDecision(Contract):
    """``llmops.gate.Decision.to_dict()``: the verdict, its reasons and every check."""

    promote: bool
    verdict: Literal["pass", "fail"]
    reasons: list[str]
    checks: list[GateCheck]


class GateOutcome(Contract):
    """``llmops.evaluation.decide``'s result: the comparison (``Comparison.to_dict()``), the gate's
    decision, the comparison as a text table and as Markdown, and the judge that scored it."""

    comparison: dict[str, Any]
    decision: GateDecision
    table: str
    markdown: str
    judge: str


# -- the registered candidate ------------------------------------------------------------------


class RegisteredCandidate(Contract):
    """What ``register_model`` hands on: the model version it registered
    (``llmops.tracking.RegisteredVersion``, in its field order), the training job's final metrics
    and the URI of the model archive the evaluation loads."""

    model_name: str
    version: str
    run_id: str
    experiment_id: str
    source: str
    created: bool
    metrics: dict[str, Any]
    artifact_uri: str
