"""The one training entrypoint, for every backend (local subprocess, torchrun, SageMaker, EC2).

    python -m training.train --base_model PATH --peft_method lora --max_steps 30
    torchrun --nproc_per_node 2 -m training.train ...          # data parallel (gloo on CPU)

Reads hyperparameters from ``$SM_INPUT_CONFIG_DIR/hyperparameters.json`` and ``--flags``, the
``train`` and ``validation`` channels from ``$SM_CHANNEL_TRAIN`` / ``$SM_CHANNEL_VALIDATION``,
checkpoints in ``$LLMOPS_CHECKPOINT_DIR`` (default ``/opt/ml/checkpoints``; a restarted job
resumes from the newest one), and writes to ``$SM_MODEL_DIR``: the adapter (or the full model),
the tokenizer, ``training_config.json``, ``metrics.json`` and a model card ``README.md``. Metrics
are printed as ``name=value;`` lines that SageMaker ``MetricDefinitions`` can parse.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from training.config import JobPaths, TrainConfig, load_config
from training.data import Collator, encode_all, read_split

BASELINE = "baseline_metrics.json"


def metric_line(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.6g};" if isinstance(v, float) else f"{k}={v};" for k, v in metrics.items())


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(message: str) -> None:
    if _is_main_process():
        print(message, flush=True)


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def _transformers_at_least(version: str) -> bool:
    """The Neuron training image pins an older Transformers than this project's."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(version)


def _warmup(ratio: float) -> dict:
    # Transformers 5 takes a float below 1 in warmup_steps as a ratio; 4.x has warmup_ratio.
    return {"warmup_steps": ratio} if _transformers_at_least("5.0") else {"warmup_ratio": ratio}


def on_trainium() -> bool:
    """A Trainium (Neuron) host with optimum-neuron: the Hugging Face Neuron training image."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch_neuronx") is not None and (
            importlib.util.find_spec("optimum.neuron") is not None
        )
    except ModuleNotFoundError:  # no optimum at all
        return False


def trainer_classes(config: TrainConfig) -> tuple[type, type, dict]:
    """(TrainingArguments class, Trainer class, device arguments) for this machine. On Trainium
    optimum-neuron's trainer runs the same loop on the NeuronCores through XLA, in bf16 (one
    process per core, started by torch_distributed); elsewhere the Transformers Trainer runs on
    CUDA or the CPU (gloo between processes)."""
    if on_trainium():
        from optimum.neuron import NeuronTrainer, NeuronTrainingArguments

        return NeuronTrainingArguments, NeuronTrainer, {"bf16": True}
    import torch
    from transformers import Trainer, TrainingArguments

    cuda = torch.cuda.is_available()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return (
        TrainingArguments,
        Trainer,
        {
            "bf16": config.precision == "bf16",
            "use_cpu": not cuda,
            "ddp_backend": "gloo" if not cuda and processes > 1 else None,
        },
    )


def build_model(config: TrainConfig, base_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    if config.peft_method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            bnb = False
        else:
            bnb = True
        if not (cuda and bnb):
            raise ValueError(
                "peft_method=qlora needs a CUDA GPU and the bitsandbytes package "
                f"(CUDA available: {cuda}, bitsandbytes installed: {bnb}); use lora on this machine"
            )
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    if config.precision == "bf16" and not cuda and not _cpu_has_native_bf16() and not on_trainium():
        _say("warning: this CPU has no native bf16 (no AMX or AVX512-BF16); bf16 will be much slower than fp32")
    kwargs: dict = {("dtype" if _transformers_at_least("4.56") else "torch_dtype"): dtype}
    if config.peft_method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, **kwargs)  # nosec B615 - a folder
    if config.peft_method == "full":
        return model
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    if config.peft_method == "prompt_tuning":
        peft_config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.prompt_tuning_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
    else:
        if config.peft_method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in config.lora_target_modules if m not in present]
        if missing:
            raise ValueError(
                f"lora_target_modules: {missing} not found in {base_dir} (it has e.g. {sorted(present)[:12]})"
            )
        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
        )
    return get_peft_model(model, peft_config)


def _trainer_callback():
    from transformers import TrainerCallback

    class MetricLines(TrainerCallback):
        """Every log event as one ``name=value;`` line, for SageMaker MetricDefinitions."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                values = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
                values["step"] = state.global_step
                print(metric_line(values), flush=True)

    return MetricLines()


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that a kill did not cut short. The Trainer writes ``trainer_state.json``
    last, so a folder without a readable one was being saved when the job died; resuming from it
    fails (or, without its state, would restart the schedule on trained weights)."""
    complete = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            _say(f"ignoring checkpoint {path}: it was cut short (no readable trainer_state.json)")
            continue
        complete.append((int(state["global_step"]), path))
    return max(complete)[1] if complete else None


def _finished_state(checkpoint: Path | None):
    """The checkpoint's ``TrainerState`` when it was saved at the last step, else None."""
    from transformers import TrainerState

    if checkpoint is None:
        return None
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return state if 0 < state.max_steps <= state.global_step else None


def _logged_train_loss(history: list[dict]) -> dict:
    """The mean training loss over the steps the logged losses cover (each logged loss is the mean
    of the steps since the one before)."""
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    total, previous = 0.0, 0
    for step, loss in logged:
        total, previous = total + loss * (step - previous), step
    return {"train_loss": total / previous} if previous else {}


def write_model_card(path: Path, config: TrainConfig, metrics: dict, lineage: dict) -> None:
    lines = [
        f"# Fine-tuned {Path(config.base_model).name}",
        "",
        f"- PEFT method: {config.peft_method}",
        f"- Base model: {lineage.get('base_model_name', config.base_model)}",
        f"- Precision: {config.precision}",
        f"- Steps: {metrics.get('global_step')}, epochs: {metrics.get('epoch'):.3g}" if metrics.get("epoch") else "",
        f"- Held-out loss: {metrics.get('eval_loss_before', float('nan')):.4f} before, "
        f"{metrics.get('eval_loss', float('nan')):.4f} after",
    ]
    if lineage:
        lines += ["", "## Lineage", "", *[f"- {k}: {v}" for k, v in sorted(lineage.items())]]
    lines += ["", "## Training configuration", "", "```json", json.dumps(config.to_dict(), indent=2), "```", ""]
    path.write_text("\n".join(line for line in lines if line is not None))


def train(config: TrainConfig, paths: JobPaths) -> dict:
    from transformers import AutoTokenizer, set_seed

    base_dir = paths.base_model_dir or config.base_model
    if not base_dir or not (Path(base_dir) / "config.json").is_file():
        raise ValueError(f"base_model: {base_dir!r} is not a model folder with a config.json")
    set_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)  # nosec B615 - a folder
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set, eval_set = _load_data(config, paths, tokenizer)
    model = build_model(config, base_dir)
    trainer = _build_trainer(config, paths, model, tokenizer, train_set, eval_set)

    resume_from = last_complete_checkpoint(paths.checkpoint_dir)
    baseline = _baseline(trainer, paths.checkpoint_dir / BASELINE, bool(eval_set))
    if resume_from:
        _say(f"resuming from checkpoint {resume_from}")
    started = time.monotonic()
    trained = _fit(trainer, config, resume_from)
    final = trainer.evaluate() if eval_set else {}
    metrics = {
        **baseline,
        **{k: float(v) for k, v in trained.items() if isinstance(v, (int, float))},
        **{k: float(v) for k, v in final.items() if isinstance(v, (int, float))},
        "global_step": trainer.state.global_step,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "train_wall_seconds": round(time.monotonic() - started, 2),
    }
    if "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    _say(metric_line({k: metrics[k] for k in ("eval_loss", "eval_perplexity", "train_loss") if k in metrics}))
    if trainer.is_world_process_zero():
        _save(trainer, tokenizer, config, paths.model_dir, metrics)
    return metrics


def _load_data(config: TrainConfig, paths: JobPaths, tokenizer) -> tuple[list, list]:
    """The encoded train and validation examples, each cut to its configured maximum."""

    train_records = read_split(paths.train_dir, "train")
    eval_records = read_split(paths.validation_dir, "validation")
    if config.max_train_samples:
        train_records = train_records[: config.max_train_samples]
    if config.max_eval_samples:
        eval_records = eval_records[: config.max_eval_samples]
    train_set = encode_all(tokenizer, train_records, config.max_seq_length)
    eval_set = encode_all(tokenizer, eval_records, config.max_seq_length)
    if not train_set:
        raise ValueError(f"no usable training example in {paths.train_dir} (max_seq_length={config.max_seq_length})")
    _say(f"examples: train={len(train_set)} validation={len(eval_set)}")
    return train_set, eval_set


def _build_trainer(config: TrainConfig, paths: JobPaths, model, tokenizer, train_set: list, eval_set: list):

    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    arguments_class, trainer_class, device = trainer_classes(config)
    _say(f"trainer: {trainer_class.__name__} ({', '.join(f'{k}={v}' for k, v in device.items())})")
    args = arguments_class(
        output_dir=str(paths.checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        **_warmup(config.warmup_ratio),
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.checkpoint_steps,
        save_total_limit=2,
        eval_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        **device,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not _is_main_process(),
    )
    return trainer_class(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=[_trainer_callback()],
    )


def _baseline(trainer, baseline_file: Path, has_eval_set: bool) -> dict:
    """The held-out loss before training: measured once, then read back by a restarted job."""
    if baseline_file.is_file():
        baseline = json.loads(baseline_file.read_text())
    else:
        baseline = {"eval_loss_before": trainer.evaluate()["eval_loss"]} if has_eval_set else {}
        if _is_main_process():
            baseline_file.write_text(json.dumps(baseline))
    if baseline:
        _say(metric_line(baseline))
    return baseline


def _fit(trainer, config: TrainConfig, resume_from: Path | None) -> dict:
    """Train to the end (from ``resume_from`` when there is one); the training metrics."""
    from transformers import set_seed

    finished = _finished_state(resume_from)
    if finished is not None:
        # Killed after its last step was saved: Trainer.train would take one more step before it
        # checks max_steps (mid-epoch), so the checkpoint itself is the result.
        _say(f"checkpoint {resume_from} is the last step ({finished.global_step}); nothing left to train")
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = finished
        return _logged_train_loss(finished.log_history)
    if resume_from is None:
        # A restart that found no whole checkpoint skipped the baseline evaluation above, which
        # draws random numbers: reseed, so it trains as the first attempt did.
        set_seed(config.seed)
    return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics


def _save(trainer, tokenizer, config: TrainConfig, model_dir: Path, metrics: dict) -> None:
    """The model (or adapter), the tokenizer, the configuration with its lineage, the metrics and a model card."""
    model_dir.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    lineage = json.loads(os.environ.get("LLMOPS_LINEAGE", "{}"))
    (model_dir / "training_config.json").write_text(
        json.dumps({**config.to_dict(), "lineage": lineage}, indent=2, sort_keys=True)
    )
    history = [entry for entry in trainer.state.log_history if "loss" in entry or "eval_loss" in entry]
    (model_dir / "metrics.json").write_text(
        json.dumps({"final": metrics, "history": history}, indent=2, sort_keys=True)
    )
    write_model_card(model_dir / "README.md", config, metrics, lineage)


def main(argv: list[str] | None = None) -> int:
    paths = JobPaths.from_env()
    try:
        config = load_config(argv, paths)
        train(config, paths)
    except (ValueError, FileNotFoundError) as exc:
        print(f"training failed: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
