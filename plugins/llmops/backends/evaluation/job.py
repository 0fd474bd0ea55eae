"""What both evaluation backends are given and give back: the job's spec and result, and the
generation settings the evaluation entrypoint (``training.evaluate``) reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmops.config import Settings


@dataclass(frozen=True)
class EvaluationJobSpec:
    """An evaluation job: ``models`` maps a label to its base model folder and, for a fine-tuned
    model, the URI of its ``model.tar.gz``; ``items_uri`` is the JSONL of items to answer."""

    job_name: str
    items_uri: str
    models: dict[str, dict]  # label -> {"base": folder, "artifact_uri": URI or None}
    embedding_model: str
    settings: dict = field(default_factory=dict)  # max_new_tokens, batch_size, max_input_tokens, seed
    timeout_s: float = 3600


@dataclass(frozen=True)
class EvaluationJobResult:
    job_name: str
    backend: str
    predictions_uri: str
    summary: dict
    log_uri: str
    reused: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def evaluation_settings(settings: Settings) -> dict:
    ev = settings.evaluation
    return {"max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size, "max_input_tokens": ev.max_input_tokens}
