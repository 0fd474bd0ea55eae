"""The training job's typed configuration and where it reads and writes.

Hyperparameters follow the SageMaker training-toolkit conventions: a JSON object in
``$SM_INPUT_CONFIG_DIR/hyperparameters.json`` (values may be strings, as SageMaker writes them),
overridden by ``--name value`` flags. Paths come from the ``SM_*`` environment variables, so the
local backend runs the same entrypoint by setting them to folders of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

PeftMethod = Literal["lora", "qlora", "prompt_tuning", "full"]
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one fine-tuning job. Every field can be set by name."""

    base_model: str = ""
    peft_method: PeftMethod = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    prompt_tuning_virtual_tokens: int = 16
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 512
    precision: Precision = "fp32"
    seed: int = 42
    checkpoint_steps: int = 50
    logging_steps: int = 5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_train_samples: int = 0
    max_eval_samples: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name, hint in get_type_hints(TrainConfig).items():
            allowed = get_args(hint)
            if allowed and all(isinstance(a, str) for a in allowed) and getattr(self, name) not in allowed:
                problems.append(f"{name}: {getattr(self, name)!r} is not one of {list(allowed)}")
        positive = (
            "lora_r",
            "lora_alpha",
            "batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
            "checkpoint_steps",
            "logging_steps",
            "prompt_tuning_virtual_tokens",
        )
        problems += [f"{n}: must be > 0, got {getattr(self, n)}" for n in positive if getattr(self, n) <= 0]
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate: must be a finite number > 0, got {self.learning_rate}")
        if not (0 <= self.warmup_ratio < 1):
            problems.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.max_steps <= 0 and self.epochs <= 0:
            problems.append("epochs: must be > 0 when max_steps is not set")
        if self.max_seq_length < 16:
            problems.append(f"max_seq_length: must be at least 16, got {self.max_seq_length}")
        if problems:
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["lora_target_modules"] = list(self.lora_target_modules)
        return values


def _list_of(name: str, text: str) -> list:
    """A list given as JSON, or as a Python literal (how a launcher may print a decoded list)."""
    import ast

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return list(ast.literal_eval(text))
        except (ValueError, SyntaxError, TypeError):
            raise ValueError(f"invalid training configuration:\n  {name}: not a list: {text!r}") from None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """SageMaker passes every hyperparameter as a string; turn it into the field's type."""
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        if isinstance(value, str):
            value = _list_of(name, value) if value.strip().startswith("[") else value.split(",")
        return tuple(str(v).strip() for v in value)
    if hint is bool:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if hint is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"invalid training configuration:\n  {name}: expected a whole number, got {value!r}")
    if hint in (int, float):
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"invalid training configuration:\n  {name}: expected {hint.__name__}, got {value!r}"
            ) from None
    return str(value) if not isinstance(value, str) else value


def config_from_mapping(values: dict[str, Any]) -> TrainConfig:
    hints = get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"invalid training configuration:\n  unknown hyperparameter(s): {', '.join(unknown)}")
    return TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


@dataclass(frozen=True)
class JobPaths:
    """Where the job reads and writes (SageMaker's layout unless the environment says otherwise)."""

    config_dir: Path
    train_dir: Path
    validation_dir: Path
    model_dir: Path
    checkpoint_dir: Path
    output_dir: Path
    extra: dict[str, str] = field(default_factory=dict)
    base_model_dir: str | None = None  # a ``base_model`` channel: the base model's folder, over the name

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> JobPaths:
        env = dict(os.environ if env is None else env)
        return cls(
            config_dir=Path(env.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")),
            train_dir=Path(env.get("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train")),
            validation_dir=Path(env.get("SM_CHANNEL_VALIDATION", "/opt/ml/input/data/validation")),
            model_dir=Path(env.get("SM_MODEL_DIR", "/opt/ml/model")),
            checkpoint_dir=Path(env.get("LLMOPS_CHECKPOINT_DIR", "/opt/ml/checkpoints")),
            output_dir=Path(env.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")),
            base_model_dir=env.get("SM_CHANNEL_BASE_MODEL") or None,
        )


def load_config(argv: list[str] | None, paths: JobPaths) -> TrainConfig:
    """Defaults, then ``hyperparameters.json``, then ``--name value`` flags."""
    values: dict[str, Any] = {}
    hp_file = paths.config_dir / "hyperparameters.json"
    if hp_file.is_file():
        try:
            values.update(json.loads(hp_file.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{hp_file}: invalid JSON ({exc})") from None
        # SageMaker's own keys (sagemaker_program, sagemaker_submit_directory, ...) are the toolkit's.
        values = {k: v for k, v in values.items() if not k.startswith("sagemaker_")}
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__)
    for name in get_type_hints(TrainConfig):
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=None)
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    values.update(flags)
    return config_from_mapping(values)
