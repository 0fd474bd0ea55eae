"""Typed settings for one environment, loaded once from ``include/config/<env>.yaml``.

The environment is chosen by ``LLMOPS_ENV`` (default ``local``); ``LLMOPS_CONFIG_FILE`` names
another file to load instead. Values may reference
environment variables as ``${NAME}`` or ``${NAME:-default}``; ``LLMOPS_HOME`` (the state
folder, default ``<repo>/.llmops``), ``LLMOPS_MODELS_DIR`` (converted base models, default
``<repo>/.llmops/models``, shared by the demo and the tests) and ``LLMOPS_PROJECT_ROOT`` are
always defined. A bad value
fails at load with an error that names the file and the field.

    python -m llmops.config            # print the resolved settings of $LLMOPS_ENV
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmops.drift.statistics import DriftPolicy
from llmops.gate import GatePolicy
from llmops.rollout.policy import RolloutPolicy
from training.config import TrainConfig, config_from_mapping

PROJECT_ROOT = Path(os.environ.get("LLMOPS_PROJECT_ROOT", Path(__file__).resolve().parents[2]))
INCLUDE_DIR = PROJECT_ROOT / "include"

TrainingBackend = Literal["local", "sagemaker", "sagemaker-trainium", "ec2-trainium"]
TRAINING_BACKENDS: tuple[str, ...] = get_args(TrainingBackend)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(ValueError):
    """A configuration file is missing or holds a bad value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsConfig(_Strict):
    """Named models. A name is either a built-in (see ``llmops.models``) or a model folder."""

    cache_dir: str
    base: str = "smollm2-135m-instruct"
    embedding: str = "all-minilm-l6-v2"
    embedding_runtime: Literal["auto", "numpy", "torch"] = Field(
        "auto",
        description="how Airflow workers embed text for drift and rollout scoring: torch (sentence-transformers),"
        " numpy (llmops.encoder, no torch), or auto: torch when torch and sentence-transformers import, else numpy",
    )


class SplitConfig(_Strict):
    """Fractions of the deterministic hash split. A record's split depends only on its prompt
    and ``salt``, so it keeps its split across dataset versions."""

    train: float = Field(0.8, gt=0, lt=1)
    validation: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    salt: str = Field("llmops-split-v1", min_length=1)
    respect_source_split: bool = True

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must equal 1.0, got {total:g}")
        return self


class DataConfig(_Strict):
    """How raw text becomes a curated instruction dataset."""

    dataset_name: str = Field("python-docs-instruct", pattern=r"^[a-z0-9][a-z0-9._-]*$")
    raw_uri: str | None = None
    template: str = "python_docs_qa"
    max_tokens: int = Field(512, ge=16, le=131072)
    over_length: Literal["drop", "truncate", "fail"] = "drop"
    max_over_length_fraction: float = Field(0.2, ge=0, le=1)
    max_duplicate_fraction: float = Field(0.5, ge=0, le=1)
    max_empty_fraction: float = Field(0.2, ge=0, le=1)
    min_records_per_split: int = Field(1, ge=1)
    scrub_pii: bool = True
    split: SplitConfig = SplitConfig()
    expectation_suite: str = "curated_dataset"


class FinetuneConfig(_Strict):
    """How ``llm_finetune`` runs: when, where, and the default hyperparameters (any field of
    ``training.config.TrainConfig``; the trigger form overrides them per run)."""

    model_name: str = Field("python-docs-assistant", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    schedule: str = "0 2 * * *"
    timezone: str = "UTC"
    backend: TrainingBackend = "local"
    processes: int = Field(1, ge=1, le=64)
    timeout_minutes: int = Field(120, ge=1)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _hyperparameters_are_valid(self) -> FinetuneConfig:
        self.train_config()
        return self

    def train_config(self) -> TrainConfig:
        """The run's default hyperparameters, typed: ``TrainConfig``'s defaults with this file's
        ``hyperparameters`` over them. The one source of the trigger form's defaults."""
        return config_from_mapping(self.hyperparameters)

    @model_validator(mode="after")
    def _schedule_is_cron(self) -> FinetuneConfig:
        from croniter import croniter

        if not croniter.is_valid(self.schedule):
            raise ValueError(f"schedule: {self.schedule!r} is not a cron expression")
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: unknown time zone {self.timezone!r}") from None
        return self


class EvaluationConfig(_Strict):
    """How candidates are evaluated, judged and gated (``llm_finetune``'s second half)."""

    max_test_items: int = Field(48, ge=1, description="test-split items per evaluation (a fixed sample)")
    max_new_tokens: int = Field(96, ge=1, le=4096)
    batch_size: int = Field(8, ge=1, le=512)
    max_input_tokens: int = Field(384, ge=16)
    bootstrap_resamples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    backend: Literal["local", "sagemaker"] = Field(
        "local", description="where the evaluation job runs: here, or as a SageMaker Processing job (S3 store)"
    )
    judge: Literal["local", "bedrock"] = "local"
    judge_model_id: str = "anthropic.claude-3-5-sonnet-20240620-v1:0"
    judge_max_workers: int = Field(4, ge=1, le=64)
    timeout_minutes: int = Field(60, ge=1)
    require_approval: bool = False
    approval_timeout_hours: float = Field(24, gt=0)
    gate: GatePolicy = GatePolicy()

    def policy(self) -> GatePolicy:
        return self.gate


class SageMakerEndpointConfig(_Strict):
    """A SageMaker real-time endpoint (serving backend ``sagemaker``): the image that runs
    ``serving.app`` (built from this repository's Dockerfile and pushed to ECR), its instances,
    and the deployment guardrails of a blue/green update."""

    image_uri: str = Field("", max_length=255, description="the serving image in ECR ({region} is filled in)")
    instance_type: str = Field("ml.g5.xlarge", pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
    instance_count: int = Field(1, ge=1, le=16)
    kms_key_id: str | None = Field(None, description="encrypts the instances' volumes and the captured data")
    rollback_alarms: bool = Field(
        True,
        description="a blue/green update of a whole endpoint rolls back by itself when the new variant's"
        " 5xx or p99 latency alarm fires",
    )
    alarm_periods: int = Field(2, ge=1, le=10, description="one-minute periods an alarm must breach before it fires")
    blue_green_wait_seconds: int = Field(300, ge=0, le=3600, description="how long a blue/green update bakes")
    metrics_delay_seconds: float = Field(
        90, ge=0, le=900, description="how long CloudWatch takes to publish a minute's endpoint metrics"
    )
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("kms_key_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value


class ServingConfig(_Strict):
    """Where models serve and how ``llm_rollout`` moves traffic (``rollout``: a ``RolloutPolicy``)."""

    backend: Literal["local", "sagemaker"] = "local"
    sagemaker: SageMakerEndpointConfig = SageMakerEndpointConfig()
    gateway_url: str = Field("http://127.0.0.1:8090", pattern=r"^https?://")
    gateway_conn_id: str = Field(
        "llmops_gateway",
        min_length=1,
        description="Airflow connection whose password is the local gateway's API key (else LLMOPS_GATEWAY_API_KEY)",
    )
    guardrails: Literal["off", "flag", "block"] | None = Field(
        None,
        description="the local gateway's guardrail mode for this endpoint's configs (None: the gateway's --guardrails)",
    )
    endpoint_name: str = Field("python-docs-assistant", pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$", max_length=63)
    capture_uri: str = Field(
        min_length=1, description="the data capture destination (folder, file:// or s3://); default <store_uri>/capture"
    )
    sampling_percentage: int = Field(100, ge=0, le=100)
    deploy_timeout_minutes: float = Field(15, gt=0)
    replay_max_new_tokens: int = Field(48, ge=1, le=2048)
    replay_concurrency: int = Field(1, ge=1, le=64)
    max_batch_size: int = Field(8, ge=1, le=256, description="concurrent requests a model server generates together")
    batch_wait_ms: float = Field(5, ge=0, le=1000, description="how long a batch's first request waits for more")
    rollout: RolloutPolicy = RolloutPolicy()

    @model_validator(mode="after")
    def _rollout_fits_the_backend(self) -> ServingConfig:
        if self.backend == "sagemaker" and not self.capture_uri.startswith("s3://"):
            raise ValueError(f"backend sagemaker captures to S3: capture_uri {self.capture_uri!r} is not s3://")
        blue_green = 2 * self.sagemaker.blue_green_wait_seconds + 900  # both waits and a new fleet's start
        if (
            self.backend == "sagemaker"
            and self.sagemaker.rollback_alarms
            and self.deploy_timeout_minutes * 60 < blue_green
        ):
            raise ValueError(
                f"deploy_timeout_minutes {self.deploy_timeout_minutes:g} is shorter than a blue/green update"
                f" ({blue_green / 60:g} minutes with sagemaker.blue_green_wait_seconds"
                f" {self.sagemaker.blue_green_wait_seconds}): the task would give up while SageMaker still works"
            )
        return self

    def policy(self, overrides: dict[str, Any] | None = None) -> RolloutPolicy:
        """The rollout policy, with a run's ``overrides`` (``"section.field": value``) over it."""
        if not overrides:
            return self.rollout
        data = self.rollout.model_dump()
        for key, value in (overrides or {}).items():
            section, _, name = key.rpartition(".")
            target = data.setdefault(section, {}) if section else data
            target[name] = value
        try:
            return RolloutPolicy.model_validate(data)
        except ValidationError as exc:
            raise ValueError("rollout: " + format_validation_error(exc).strip()) from None


class MonitoringConfig(_Strict):
    """How ``llm_drift_monitor`` watches captured traffic (``policy``: a ``DriftPolicy``)."""

    schedule: str = "0 * * * *"
    timezone: str = "UTC"
    experiment: str = Field("llmops-drift-monitoring", min_length=1, description="MLflow experiment of drift runs")
    baseline_sample: int = Field(512, ge=10, le=4000, description="training prompts embedded in a baseline")
    capture_delay_minutes: float = Field(
        0, ge=0, le=1440, description="scheduled windows end this much earlier: capture files arrive late on S3"
    )
    policy: DriftPolicy = DriftPolicy()

    @model_validator(mode="after")
    def _valid(self) -> MonitoringConfig:
        from croniter import croniter

        if not croniter.is_valid(self.schedule):
            raise ValueError(f"schedule: {self.schedule!r} is not a cron expression")
        return self

    def drift_policy(self, overrides: dict[str, Any] | None = None) -> DriftPolicy:
        """The drift policy, with a run's ``overrides`` (field: value) over it."""
        if not overrides:
            return self.policy
        try:
            return DriftPolicy.model_validate({**self.policy.model_dump(), **overrides})
        except ValidationError as exc:
            raise ValueError("policy: " + format_validation_error(exc).strip()) from None


class MlflowConfig(_Strict):
    tracking_uri: str
    artifact_uri: str
    ui_url: str | None = Field(None, description="the MLflow UI's address, for links in reports and descriptions")


class AwsConfig(_Strict):
    conn_id: str = "aws_default"
    region: str | None = None


HF_TRAINING_GPU = (
    "763104351884.dkr.ecr.{region}.amazonaws.com/huggingface-pytorch-training:"
    "2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04"
)
HF_INFERENCE_GPU = (
    "763104351884.dkr.ecr.{region}.amazonaws.com/huggingface-pytorch-inference:"
    "2.6.0-transformers4.51.3-gpu-py312-cu124-ubuntu22.04"
)
EVALUATION_REQUIREMENTS = [
    "transformers==5.23.0",
    "peft==0.21.2",
    "sentence-transformers",
    "rouge-score",
    "sacrebleu",
]
HF_TRAINING_NEURON = (
    "763104351884.dkr.ecr.{region}.amazonaws.com/huggingface-pytorch-training-neuronx:"
    "2.8.0-transformers4.55.4-neuronx-py310-sdk2.26.0-ubuntu22.04"
)


class SageMakerTarget(_Strict):
    """Where a SageMaker training job runs: its instances and image (``{region}`` is filled in)."""

    instance_type: str = Field(pattern=r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
    instance_count: int = Field(1, ge=1, le=64)
    image_uri: str = Field(min_length=1, max_length=255)
    requirements: list[str] = Field(default_factory=list, description="pip lines the container installs first")


class Ec2Config(_Strict):
    """EC2 Trainium training (backend ``ec2-trainium``): a trn1 instance driven over SSM."""

    ami_id: str | None = Field(None, description="the Neuron deep-learning AMI; default: ami_parameter's value")
    ami_parameter: str = "/aws/service/neuron/dlami/multi-framework/ubuntu-22.04/latest/image_id"
    instance_type: str = Field("trn1.2xlarge", pattern=r"^trn[12]n?\.[0-9]*xlarge$")
    instance_profile: str | None = Field(None, description="an instance profile with SSM core and the store's S3")
    subnet_id: str | None = None
    security_group_ids: list[str] = Field(default_factory=list, max_length=5)
    volume_size_gb: int = Field(200, ge=8, le=16384)
    activate: str = Field(
        ". /opt/aws_neuronx_venv_pytorch_2_8/bin/activate", description="enters the AMI's Neuron Python environment"
    )
    ssm_online_timeout_minutes: int = Field(20, ge=1, le=120)
    command_timeout_minutes: int = Field(480, ge=1, le=2880)
    poll_seconds: int = Field(60, ge=1, le=3600)
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("ami_id", "instance_profile", "subnet_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value


class SageMakerConfig(_Strict):
    """SageMaker training jobs (backends ``sagemaker`` and ``sagemaker-trainium``)."""

    role_arn: str | None = Field(None, pattern=r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
    gpu: SageMakerTarget = SageMakerTarget(instance_type="ml.g5.2xlarge", image_uri=HF_TRAINING_GPU)
    trainium: SageMakerTarget = SageMakerTarget(instance_type="ml.trn1.2xlarge", image_uri=HF_TRAINING_NEURON)
    evaluation: SageMakerTarget = SageMakerTarget(
        instance_type="ml.g5.xlarge", image_uri=HF_INFERENCE_GPU, requirements=EVALUATION_REQUIREMENTS
    )
    volume_size_gb: int = Field(100, ge=1, le=16384)
    max_runtime_minutes: int = Field(480, ge=1, le=40320)
    spot: bool = False
    max_wait_minutes: int | None = Field(None, ge=1, description="spot only; default twice max_runtime_minutes")
    poll_seconds: int = Field(60, ge=1, le=3600, description="how often a waiting task asks SageMaker for the job")
    deferrable: bool = Field(False, description="wait in the triggerer (needs the provider's aiobotocore extra)")
    kms_key_id: str | None = None
    subnets: list[str] = Field(default_factory=list, max_length=16)
    security_groups: list[str] = Field(default_factory=list, max_length=5)
    tags: dict[str, str] = Field(default_factory=dict)
    prices_per_hour: dict[str, float] = Field(
        default_factory=lambda: {
            "ml.g5.xlarge": 1.408,
            "ml.g5.2xlarge": 1.515,
            "ml.g5.12xlarge": 7.09,
            "ml.trn1.2xlarge": 1.5,
            "ml.trn1.32xlarge": 24.72,
            "ml.m5.xlarge": 0.23,
            "trn1.2xlarge": 1.34375,
            "trn1.32xlarge": 21.50,
        },
        description="USD per instance-hour (SageMaker ml.* and EC2), for the cost recorded with each run;"
        " check your region's prices",
    )

    @field_validator("role_arn", "kms_key_id", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _consistent(self) -> SageMakerConfig:
        if not self.trainium.instance_type.startswith(("ml.trn1", "ml.trn2")):
            raise ValueError(f"trainium.instance_type {self.trainium.instance_type!r} is not a Trainium instance")
        if bool(self.subnets) != bool(self.security_groups):
            raise ValueError("subnets and security_groups go together: set both for a VPC, or neither")
        if self.max_wait_minutes is not None and self.max_wait_minutes < self.max_runtime_minutes:
            raise ValueError("max_wait_minutes must be at least max_runtime_minutes")
        return self


class Settings(_Strict):
    """Everything one environment needs. Secrets never live here: they come from Airflow
    connections named by ``*_conn_id`` fields."""

    env: str
    home: str
    store_uri: str
    models: ModelsConfig
    data: DataConfig = DataConfig()
    mlflow: MlflowConfig
    finetune: FinetuneConfig = FinetuneConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    serving: ServingConfig
    monitoring: MonitoringConfig = MonitoringConfig()
    aws: AwsConfig = AwsConfig()
    sagemaker: SageMakerConfig = SageMakerConfig()
    ec2: Ec2Config = Ec2Config()

    @model_validator(mode="before")
    @classmethod
    def _serving_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("store_uri"), str):
            serving = dict(data.get("serving") or {})
            serving.setdefault("capture_uri", f"{data['store_uri'].rstrip('/')}/capture")
            data = {**data, "serving": serving}
        return data

    @model_validator(mode="after")
    def _store_is_uri(self) -> Settings:
        if "://" not in self.store_uri:
            raise ValueError(f"store_uri must be a URI such as file:///... or s3://..., got {self.store_uri!r}")
        if self.evaluation.backend == "sagemaker" and not self.store_uri.startswith("s3://"):
            raise ValueError("evaluation.backend sagemaker reads its inputs from S3: store_uri must be s3://...")
        return self

    def datasets_uri(self) -> str:
        return f"{self.store_uri.rstrip('/')}/datasets"

    def runs_uri(self) -> str:
        return f"{self.store_uri.rstrip('/')}/runs"


def default_home() -> str:
    return os.environ.get("LLMOPS_HOME", str(PROJECT_ROOT / ".llmops"))


def _expand(value: object, where: str, env: dict[str, str]) -> object:
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    return _substitute(value, where, env)


def _substitute(text: str, where: str, env: dict[str, str]) -> str:
    """Expand ``${NAME}`` and ``${NAME:-default}``; a default may itself hold references."""
    out, i = [], 0
    while (start := text.find("${", i)) != -1:
        out.append(text[i:start])
        depth, j = 1, start + 2
        while j < len(text) and depth:
            if text.startswith("${", j):
                depth, j = depth + 1, j + 2
                continue
            depth -= text[j] == "}"
            j += 1
        if depth:
            raise ConfigError(f"{where}: unclosed '${{' in {text!r}")
        body = text[start + 2 : j - 1]
        name, has_default, default = body.partition(":-")
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"{where}: {name!r} is not an environment variable name (in {text!r})")
        if name in env:
            out.append(env[name])
        elif has_default:
            out.append(_substitute(default, where, env))
        else:
            raise ConfigError(f"{where}: environment variable {name} is not set and has no default")
        i = j
    out.append(text[i:])
    return "".join(out)


def load_settings(env: str | None = None, path: Path | None = None) -> Settings:
    """Load and validate the settings of ``env`` (default ``$LLMOPS_ENV`` or ``local``)."""
    env = env or os.environ.get("LLMOPS_ENV", "local")
    if path is None and os.environ.get("LLMOPS_CONFIG_FILE"):
        path = Path(os.environ["LLMOPS_CONFIG_FILE"])
    path = path or INCLUDE_DIR / "config" / f"{env}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (INCLUDE_DIR / "config").glob("*.yaml"))
        raise ConfigError(f"no configuration for environment {env!r}: {path} does not exist (known: {known})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    variables = {
        "LLMOPS_MODELS_DIR": str(PROJECT_ROOT / ".llmops" / "models"),
        **os.environ,
        "LLMOPS_HOME": default_home(),
        "LLMOPS_PROJECT_ROOT": str(PROJECT_ROOT),
    }
    raw = _expand(raw, "", variables)
    raw.setdefault("env", env)
    raw.setdefault("home", variables["LLMOPS_HOME"])
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid settings:\n{format_validation_error(exc)}") from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad field: ``data.split.train: Input should be less than 1 (got 1.5)``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        lines.append(f"  {field}: {err['msg']}{got}")
    return "\n".join(lines)


@functools.cache
def get_settings() -> Settings:
    """The settings of this process's environment, loaded once."""
    return load_settings()


if __name__ == "__main__":
    print(yaml.safe_dump(get_settings().model_dump(), sort_keys=False))
