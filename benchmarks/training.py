"""Training throughput: ``training.train`` against a naive baseline on the same model (the base
model, LoRA on the attention projections), the same examples in the same order and the same
number of optimizer steps. The baseline is the Transformers ``Trainer`` in fp32 with every batch
padded to the maximum length. Each side runs in its own process (peak memory is the process's).

Reported: non-padding tokens per second (the speedup is the ratio in this run), peak resident
memory, held-out loss after the same tokens, and model FLOP/s as a share of this machine's bf16
matmul peak, measured here. Model FLOPs per token for LoRA on a frozen base: forward 2N plus the
backward pass through the activations 2N (no gradients for the frozen weights), plus attention
4·layers·context·hidden; N counts every weight matrix a token passes through."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Figure

STEPS = 8
HYPERPARAMETERS = {
    "peft_method": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,  # dropout draws random numbers: the sides would see different noise
    "batch_size": 4,
    "max_seq_length": 384,
    "learning_rate": 1e-3,
    "max_steps": STEPS,
    "logging_steps": STEPS,
    "checkpoint_steps": 10_000,
    "warmup_ratio": 0.0,
    "max_eval_samples": 32,
    "seed": 42,
}
TARGET_SPEEDUP = 4.0
TARGET_MFU = 0.40


def _channels(folder: Path, records: list[dict]) -> None:
    for split, part in (("train", records[:400]), ("validation", records[400:432])):
        (folder / split).mkdir(parents=True, exist_ok=True)
        (folder / split / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


def _side(kind: str, base: str, data: Path, out: Path, precision: str) -> dict:
    """One side, run in this process: 'ours' (training.train) or 'baseline' (plain Trainer)."""
    import resource

    import transformers

    import training.data
    from training.config import JobPaths, config_from_mapping

    counted = {"tokens": 0, "training": False}
    train_method = transformers.Trainer.train

    def counting_train(self, *args, **kwargs):  # only batches collated while training count
        counted["training"] = True
        try:
            return train_method(self, *args, **kwargs)
        finally:
            counted["training"] = False

    transformers.Trainer.train = counting_train

    class Counting(training.data.Collator):
        def __init__(self, pad_token_id: int, width: int | None = None):
            super().__init__(pad_token_id)
            self.width = width

        def __call__(self, batch):
            result = super().__call__(batch)
            if counted["training"]:
                counted["tokens"] += int(result["attention_mask"].sum())
            if self.width:  # the baseline: pad every batch to the maximum length
                import torch

                pad = self.width - result["input_ids"].shape[1]
                if pad > 0:
                    result["input_ids"] = torch.nn.functional.pad(
                        result["input_ids"], (0, pad), value=self.pad_token_id
                    )
                    result["labels"] = torch.nn.functional.pad(
                        result["labels"], (0, pad), value=training.data.IGNORE_INDEX
                    )
                    result["attention_mask"] = torch.nn.functional.pad(result["attention_mask"], (0, pad), value=0)
            return result

    config = config_from_mapping({**HYPERPARAMETERS, "base_model": base, "precision": precision})
    paths = JobPaths(
        config_dir=out / "config",
        train_dir=data / "train",
        validation_dir=data / "validation",
        model_dir=out / "model",
        checkpoint_dir=out / "checkpoints",
        output_dir=out / "output",
    )
    if kind == "ours":
        training.data.Collator = Counting  # only counts: the same padding as in production
        from training.train import train

        metrics = train(config, paths)
        seconds, loss = metrics["train_runtime"], metrics["eval_loss"]
    else:
        import torch
        from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

        from training.data import encode_all, read_split
        from training.train import build_model

        set_seed(config.seed)
        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        train_set = encode_all(tokenizer, read_split(paths.train_dir, "train"), config.max_seq_length)
        eval_set = encode_all(tokenizer, read_split(paths.validation_dir, "validation")[:32], config.max_seq_length)
        args = TrainingArguments(
            output_dir=str(out / "baseline"),
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            max_steps=config.max_steps,
            lr_scheduler_type="cosine",
            logging_steps=config.max_steps,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            seed=config.seed,
            data_seed=config.seed,
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=build_model(config, base),
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            data_collator=Counting(tokenizer.pad_token_id, width=config.max_seq_length),
        )
        result = trainer.train()
        seconds = result.metrics["train_runtime"]
        loss = trainer.evaluate()["eval_loss"]
    return {
        "seconds": seconds,
        "train_tokens": counted["tokens"],
        "eval_loss": loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _matmul_peak(seconds: float = 3.0) -> float:
    """bf16 matmul FLOP/s of this machine with torch's threads, the best of several sizes."""
    import time

    import torch

    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        torch.matmul(a, b)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            torch.matmul(a, b)
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - started))
    return best


def _flops_per_token(base: str, context: int) -> float:
    config = json.loads((Path(base) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    from safetensors import safe_open

    matrices = 0
    for path in Path(base).glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                shape = handle.get_slice(name).get_shape()
                if len(shape) == 2:
                    matrices += shape[0] * shape[1]
    return 4 * matrices + 4 * layers * context * hidden


def run() -> list[Figure]:
    from devtools.traffic import bundled_records
    from llmops.config import load_settings
    from llmops.models import resolve_model
    from llmops.prompts import load_template

    settings = load_settings("local")
    base = str(resolve_model(settings.models.base, settings.models.cache_dir))
    system, _ = load_template(settings.data.template).render_instruction("-")
    records = [{**r, "system": system} for r in bundled_records(settings.data.template)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = Path(tmp) / "data"
        _channels(data, records)
        for kind, precision in (("baseline", "fp32"), ("ours", "fp32"), ("ours", "bf16")):
            out = Path(tmp) / f"{kind}-{precision}"
            command = [sys.executable, "-m", "benchmarks.training", kind, base, str(data), str(out), precision]
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"{kind} {precision} failed:\n{done.stderr[-3000:]}")
            results[(kind, precision)] = json.loads(done.stdout.strip().splitlines()[-1])
    peak = _matmul_peak()
    per_token = _flops_per_token(base, HYPERPARAMETERS["max_seq_length"])
    baseline = results[("baseline", "fp32")]
    base_rate = baseline["train_tokens"] / baseline["seconds"]
    figures = [
        Figure(
            "training",
            "baseline (Trainer fp32, padded): tokens/s",
            base_rate,
            "tok/s",
            detail=f"{baseline['train_tokens']} non-padding tokens in {STEPS} steps; peak RSS "
            f"{baseline['peak_rss_mb']:.0f} MB; held-out loss {baseline['eval_loss']:.4f}",
        ),
        Figure("training", "bf16 matmul peak (measured)", peak / 1e9, "GFLOP/s"),
    ]
    for precision in ("fp32", "bf16"):
        ours = results[("ours", precision)]
        rate = ours["train_tokens"] / ours["seconds"]
        mfu = rate * per_token / peak
        detail = (
            f"peak RSS {ours['peak_rss_mb']:.0f} MB; held-out loss {ours['eval_loss']:.4f} "
            f"(baseline {baseline['eval_loss']:.4f}); {ours['train_tokens']} tokens"
        )
        speedup = rate / base_rate
        figures += [
            Figure(
                "training",
                f"training.train {precision}: speedup",
                speedup,
                "x",
                f">= {TARGET_SPEEDUP:g}x",
                speedup >= TARGET_SPEEDUP,
                detail,
            ),
            Figure(
                "training",
                f"training.train {precision}: model FLOP utilization",
                mfu * 100,
                "%",
                f">= {TARGET_MFU:.0%}",
                mfu >= TARGET_MFU,
            ),
            Figure(
                "training",
                f"training.train {precision}: held-out loss - baseline's",
                ours["eval_loss"] - baseline["eval_loss"],
                "",
                "<= 0 (1e-4 slack)",
                ours["eval_loss"] <= baseline["eval_loss"] + 1e-4,
            ),
        ]
    return figures


def _worker(argv: list[str]) -> int:
    kind, base, data, out, precision = argv
    result = _side(kind, base, Path(data), Path(out), precision)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
