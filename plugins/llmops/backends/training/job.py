"""What every training backend is given and gives back: the job's spec, its result, its error."""

from __future__ import annotations

from dataclasses import dataclass, field


class TrainingJobError(RuntimeError):
    """A training job failed, stopped or timed out; the message ends with its log tail."""


@dataclass(frozen=True)
class TrainingJobSpec:
    job_name: str
    hyperparameters: dict
    channels: dict[str, str]  # channel name -> URI of its JSONL file
    processes: int = 1
    timeout_s: float = 7200
    lineage: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingJobResult:
    job_name: str
    backend: str
    model_artifact_uri: str
    metrics: dict
    log_uri: str
    reused: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)
