"""What every training backend is given and gives back: the job's spec, its one result type, its
error.

Each backend runs the one training entrypoint in three moves, only the middle one differing:
``stage`` (what the job needs, in the store: the local job folder, or the source bundle, base
model and ``CreateTrainingJob`` request for SageMaker, or the ``RunInstances`` config and SSM
commands for EC2), ``run`` (a subprocess here; ``SageMakerTrainingOperator``; the SSM command on a
trn1 instance) and ``collect`` (the finished job as a ``TrainingJobResult``: the artifact in the
store, the final metrics read from inside it, the log, the cost). Registration takes the result's
``to_dict()`` whichever backend made it.
"""

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
    job_arn: str | None = None  # SageMaker's job ARN ("" on EC2, where there is none)
    cost: dict | None = None  # llmops.costs.estimate_cost's figures
    instance_id: str | None = None  # EC2: the instance that ran it
    output_tail: str | None = None  # EC2: the command's last output lines

    def to_dict(self) -> dict:
        """The result as tasks hand it on; fields a backend does not have are left out."""
        return {k: v for k, v in self.__dict__.items() if v is not None}
