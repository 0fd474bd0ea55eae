"""``llm_finetune``'s trigger form: every Param, its default taken from the config types.

Hyperparameter defaults are ``training.config.TrainConfig``'s, overridden by the YAML's
``finetune.hyperparameters``; enums are the config types' own, so the form offers exactly what
``request_from_params`` accepts.
"""

from __future__ import annotations

from typing import get_args

from airflow.sdk import Param

from llmops.config import TRAINING_BACKENDS, Settings
from llmops.finetune import LATEST
from training.config import PeftMethod, Precision, config_from_mapping


def finetune_params(settings: Settings) -> dict[str, Param]:
    defaults = config_from_mapping(settings.finetune.hyperparameters)
    return {
        "dataset_version": Param(
            LATEST,
            type="string",
            title="Dataset version",
            description="A curated dataset version (sha256), or 'latest' for the newest.",
        ),
        "base_model": Param(
            defaults.base_model or settings.models.base,
            type="string",
            title="Base model",
            description="A built-in model name (smollm2-135m-instruct) or a Hugging Face model folder.",
        ),
        "peft_method": Param(
            defaults.peft_method,
            # qlora last: it is the one that needs special hardware
            enum=sorted(get_args(PeftMethod), key=lambda method: method == "qlora"),
            title="PEFT method",
            description="qlora needs a CUDA GPU and bitsandbytes.",
        ),
        "lora_r": Param(defaults.lora_r, type="integer", minimum=1, maximum=256, title="LoRA rank"),
        "lora_alpha": Param(defaults.lora_alpha, type="integer", minimum=1, maximum=512, title="LoRA alpha"),
        "epochs": Param(
            defaults.epochs,
            type="number",
            exclusiveMinimum=0,
            title="Epochs",
            description="Used when max steps is -1.",
        ),
        "max_steps": Param(
            defaults.max_steps,
            type="integer",
            minimum=-1,
            title="Max steps",
            description="Optimizer steps; -1 trains for the number of epochs.",
        ),
        "learning_rate": Param(
            defaults.learning_rate, type="number", exclusiveMinimum=0, maximum=1, title="Learning rate"
        ),
        "batch_size": Param(defaults.batch_size, type="integer", minimum=1, maximum=512, title="Batch size"),
        "precision": Param(
            defaults.precision,
            enum=list(get_args(Precision)),
            title="Precision",
            description="bf16 is fast only on GPUs and CPUs with AMX or AVX512-BF16.",
        ),
        "backend": Param(settings.finetune.backend, enum=list(TRAINING_BACKENDS), title="Training backend"),
        "processes": Param(
            settings.finetune.processes,
            type="integer",
            minimum=1,
            maximum=64,
            title="Processes",
            description="More than one runs torchrun (data parallel).",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force retraining",
            description="Train even if the champion was trained on this dataset version.",
        ),
        "reason": Param(
            "", type="string", title="Reason", description="Why retraining was asked for (set by the drift monitor)."
        ),
        "drift_run_id": Param(
            "",
            type="string",
            title="Drift report",
            description="The MLflow run of the drift report that asked for this run (set by the drift monitor).",
        ),
        "require_approval": Param(
            settings.evaluation.require_approval,
            type="boolean",
            title="Require human approval",
            description="A candidate that passes the gate waits for a person to approve it in the Airflow UI "
            f"(Required Actions); no answer within {settings.evaluation.approval_timeout_hours:g} h rejects it.",
        ),
    }
