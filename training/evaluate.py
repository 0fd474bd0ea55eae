"""The evaluation job: every model answers every item, and each answer is measured.

One entrypoint for every backend, in the SageMaker Processing layout (the local backend points
``LLMOPS_PROCESSING_DIR`` at a folder of its own; on SageMaker it is ``/opt/ml/processing``):

    input/config/evaluation.json   what to evaluate (see ``EvalJobConfig``)
    input/items/items.jsonl        {"item_id", "set", "kind", "system", "prompt", "reference"} per line
    input/models/<label>/          a fine-tuned model folder or ``model.tar.gz`` (PEFT adapter or full model)
    output/predictions.jsonl       one row per (item, model): the response and its metrics
    output/summary.json            per model: load time, items, mean metrics; the job's settings

    LLMOPS_PROCESSING_DIR=/tmp/job python -m training.evaluate

For each model (the base model, the candidate, the champion when there is one) it generates a
greedy answer to each item in length-sorted batches, and measures: held-out loss of the reference
answer (teacher-forced, response tokens only, exactly as in training), ROUGE-L, BLEU, chrF,
semantic similarity to the reference and to the question (MiniLM), exact match for short-answer
items, response length, repetition, refusal, latency and tokens per second. Latency is the wall
time of the batch that produced the answer: what a request served in such a batch would wait.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.archive import model_archive_limits, safe_extract
from training.chat_format import render
from training.data import IGNORE_INDEX, Collator, encode
from training.metrics import Embedder, text_metrics


@dataclass(frozen=True)
class ModelSpec:
    label: str
    base: str  # base model folder (config.json)
    adapter: str | None = None  # fine-tuned folder or model.tar.gz, relative to the processing dir or absolute


@dataclass(frozen=True)
class EvalJobConfig:
    models: tuple[ModelSpec, ...]
    embedding_model: str
    max_new_tokens: int = 96
    batch_size: int = 8
    max_input_tokens: int = 384
    seed: int = 0
    threads: int = 0  # 0: torch's default

    @classmethod
    def from_dict(cls, data: dict) -> EvalJobConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"evaluation.json: unknown field(s) {unknown}; known: {sorted(known)}")
        models = data.get("models")
        if not isinstance(models, list) or not models:
            raise ValueError("evaluation.json: 'models' must be a non-empty list of {label, base, adapter}")
        specs = []
        for i, m in enumerate(models):
            try:
                specs.append(ModelSpec(**m))
            except TypeError as exc:
                raise ValueError(f"evaluation.json: models[{i}]: {exc}") from None
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"evaluation.json: model labels must be unique, got {labels}")
        config = cls(**{**data, "models": tuple(specs)})
        for name in ("max_new_tokens", "batch_size", "max_input_tokens"):
            if int(getattr(config, name)) < 1:
                raise ValueError(f"evaluation.json: {name} must be >= 1, got {getattr(config, name)}")
        return config


@dataclass
class ProcessingPaths:
    root: Path
    config: Path = field(init=False)
    items: Path = field(init=False)
    output: Path = field(init=False)

    def __post_init__(self):
        self.config = self.root / "input" / "config" / "evaluation.json"
        self.items = self.root / "input" / "items" / "items.jsonl"
        self.output = self.root / "output"

    @classmethod
    def from_env(cls) -> ProcessingPaths:
        return cls(Path(os.environ.get("LLMOPS_PROCESSING_DIR", "/opt/ml/processing")))

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.root / p


REQUIRED_ITEM_KEYS = ("item_id", "set", "kind", "prompt", "reference")


def read_items(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation items at {path}")
    items, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON: {exc.msg}") from None
        missing = [k for k in REQUIRED_ITEM_KEYS if not isinstance(item.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n}: missing or non-string field(s) {missing}")
        if item["item_id"] in seen:
            raise ValueError(f"{path}:{n}: item_id {item['item_id']!r} appears twice")
        seen.add(item["item_id"])
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no evaluation items")
    return items


def _unpack(path: Path, into: Path) -> Path:
    """A model given as ``model.tar.gz`` is unpacked next to the outputs; an unsafe, corrupt or
    oversized archive is refused (``training.archive.ArchiveError``) and leaves nothing there."""
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist")
    return safe_extract(path, into, replace=True, **model_archive_limits())


def load_model(spec: ModelSpec, paths: ProcessingPaths, work: Path):
    """(model, tokenizer) for one spec: the base alone, a PEFT adapter on it, or a full model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = paths.resolve(spec.base)
    if not (base / "config.json").is_file():
        raise ValueError(f"model {spec.label!r}: base {base} is not a model folder with a config.json")
    folder = None if spec.adapter is None else _unpack(paths.resolve(spec.adapter), work / spec.label)
    tokenizer_dir = folder if folder is not None and (folder / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)  # nosec B615 - a folder
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Generation continues from the right edge of every row; an over-long prompt loses its start,
    # never the assistant turn's opening at its end.
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if folder is not None and not (folder / "adapter_config.json").is_file():
        if not (folder / "config.json").is_file():
            raise ValueError(f"model {spec.label!r}: {folder} holds neither a PEFT adapter nor a full model")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)  # nosec B615 - local
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)  # nosec B615 - local
        if folder is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder)
            if model.active_peft_config.peft_type == "LORA":
                # Folded into the weights, a LoRA model generates as fast as its base model.
                model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def generate(model, tokenizer, items: list[dict], config: EvalJobConfig) -> list[dict]:
    """Greedy answers, batched by prompt length; latency is the batch's wall time."""
    import torch

    texts = [render(tokenizer, item["prompt"], None, item.get("system")) for item in items]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    results: list[dict | None] = [None] * len(items)
    # The model's own stop ids (a chat model may end its turn with a token other than eos).
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = configured if isinstance(configured, list) else [configured]
    stops = [t for t in {*stops, tokenizer.eos_token_id} if t is not None]
    for start in range(0, len(order), config.batch_size):
        batch = order[start : start + config.batch_size]
        encoded = tokenizer(
            [texts[i] for i in batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=config.max_input_tokens,
            add_special_tokens=False,
        )
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **encoded,
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
            )
        elapsed = time.perf_counter() - started
        new = output[:, encoded["input_ids"].shape[1] :]
        total_new = 0
        for row, index in enumerate(batch):
            ids = new[row].tolist()
            end = next((i for i, t in enumerate(ids) if t in stops), None)
            stopped = end is not None
            ids = ids[:end] if stopped else ids
            total_new += len(ids)
            results[index] = {
                "response": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                "prompt_tokens": min(lengths[index], config.max_input_tokens),
                "response_tokens": len(ids),
                "truncated": not stopped,
                "latency_s": elapsed,
            }
        for index in batch:
            results[index]["tokens_per_s"] = total_new / elapsed if elapsed > 0 else 0.0
    return results  # type: ignore[return-value]


def reference_losses(model, tokenizer, items: list[dict], config: EvalJobConfig) -> list[float | None]:
    """Mean cross-entropy of each reference answer given its prompt (the training objective)."""
    import torch

    encoded = [
        encode(
            tokenizer,
            {"prompt": i["prompt"], "response": i["reference"], "system": i.get("system")},
            config.max_input_tokens + config.max_new_tokens,
        )
        for i in items
    ]
    collate = Collator(tokenizer.pad_token_id)
    losses: list[float | None] = []
    for start in range(0, len(encoded), config.batch_size):
        batch = collate(encoded[start : start + config.batch_size])
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logits = logits[:, :-1, :]
        # Prompt tuning prepends virtual tokens to the logits; keep the positions of the real ones.
        logits = logits[:, -labels.shape[1] :, :]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(labels.shape)
        counted = (labels != IGNORE_INDEX).sum(dim=1)
        for row in range(labels.shape[0]):
            n = int(counted[row])
            losses.append(float(token_loss[row].sum() / n) if n else None)
    return losses


def evaluate(config: EvalJobConfig, paths: ProcessingPaths, log=print) -> dict:
    import torch

    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    items = read_items(paths.items)
    embedder = Embedder(str(paths.resolve(config.embedding_model)))
    paths.output.mkdir(parents=True, exist_ok=True)
    work = paths.output.parent / "work"
    rows: list[dict] = []
    summary: dict = {"items": len(items), "config": asdict(config), "models": {}}
    for spec in config.models:
        log(f"evaluating {spec.label}: loading")
        started = time.perf_counter()
        model, tokenizer = load_model(spec, paths, work)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        answers = generate(model, tokenizer, items, config)
        generate_s = time.perf_counter() - started
        losses = reference_losses(model, tokenizer, items, config)
        del model
        responses = [a["response"] for a in answers]
        similarity = embedder.similarity(responses, [i["reference"] for i in items])
        relevance = embedder.similarity(responses, [i["prompt"] for i in items])
        for item, answer, loss, sim, rel in zip(items, answers, losses, similarity, relevance, strict=True):
            rows.append(
                {
                    "item_id": item["item_id"],
                    "set": item["set"],
                    "kind": item["kind"],
                    "model": spec.label,
                    "prompt": item["prompt"],
                    "reference": item["reference"],
                    **answer,
                    "loss": loss,
                    "semantic_similarity": sim,
                    "question_similarity": rel,
                    **text_metrics(answer["response"], item["reference"], item["kind"]),
                }
            )
        mine = [r for r in rows if r["model"] == spec.label]
        valid_losses = [r["loss"] for r in mine if r["loss"] is not None]
        model_summary = {
            "load_s": round(load_s, 3),
            "generate_s": round(generate_s, 3),
            "items": len(mine),
            "loss": sum(valid_losses) / len(valid_losses) if valid_losses else None,
            "rouge_l": sum(r["rouge_l"] for r in mine) / len(mine),
            "semantic_similarity": sum(r["semantic_similarity"] for r in mine) / len(mine),
            "tokens_per_s": sum(r["response_tokens"] for r in mine) / generate_s if generate_s else 0.0,
        }
        if model_summary["loss"] is not None:
            model_summary["perplexity"] = math.exp(model_summary["loss"])
        summary["models"][spec.label] = model_summary
        log(
            f"evaluated {spec.label}: "
            + "; ".join(f"{k}={v:.4g}" for k, v in model_summary.items() if isinstance(v, float))
        )
    _write_jsonl(paths.output / "predictions.jsonl", rows)
    # Written last: its presence marks a complete job.
    (paths.output / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    paths = ProcessingPaths.from_env()
    try:
        if not paths.config.is_file():
            raise FileNotFoundError(f"no evaluation config at {paths.config}")
        config = EvalJobConfig.from_dict(json.loads(paths.config.read_text()))
        evaluate(config, paths, log=lambda m: print(m, flush=True))
    except (ValueError, FileNotFoundError) as exc:
        print(f"evaluation failed: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
