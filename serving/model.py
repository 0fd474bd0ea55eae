"""Loading a fine-tuned model for serving, and generating with it: the "load" and "predict" of the
SageMaker inference toolkit's four functions (``serving/app.py`` holds "decode" and "encode").

The model folder (``SM_MODEL_DIR``, default ``/opt/ml/model``) is what training wrote, or a folder
holding its ``model.tar.gz``:

* a PEFT adapter at the top level (``adapter_config.json``) is served as the adapter ``default``;
* more adapters may sit in ``adapters/<name>/``; a request picks one by name;
* a full model (``config.json`` without an adapter) is served as it is.

The base model is ``LLMOPS_BASE_MODEL`` when set, else the ``base_model`` recorded in the
adapter's ``training_config.json``; ``LLMOPS_SYSTEM_PROMPT`` is put in front of plain-text inputs
(chat inputs bring their own). Everything loads once, at start-up.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from training.chat_format import render

DEFAULT_ADAPTER = "default"


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; the message says what is missing."""


def _unpack(model_dir: Path) -> Path:
    tarball = model_dir / "model.tar.gz"
    if (model_dir / "adapter_config.json").is_file() or (model_dir / "config.json").is_file():
        return model_dir
    if not tarball.is_file():
        raise ModelLoadError(f"{model_dir} holds no adapter_config.json, config.json or model.tar.gz")
    target = model_dir / "unpacked" if os.access(model_dir, os.W_OK) else Path("/tmp/llmops-model")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tar:
        tar.extractall(target, filter="data")  # members must stay inside target
    return target


def _adapter_folders(root: Path) -> dict[str, Path]:
    adapters = {}
    if (root / "adapter_config.json").is_file():
        adapters[DEFAULT_ADAPTER] = root
    extra = root / "adapters"
    if extra.is_dir():
        for folder in sorted(p for p in extra.iterdir() if (p / "adapter_config.json").is_file()):
            adapters[folder.name] = folder
    return adapters


def _base_of(adapter_dir: Path) -> str | None:
    config = adapter_dir / "training_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("base_model")
    return None


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    adapters: tuple[str, ...]
    system: str | None
    max_context: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def generate(
        self,
        inputs: str | list[dict],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str],
        adapter: str | None,
    ) -> dict:
        import torch

        if isinstance(inputs, str):
            text = render(self.tokenizer, inputs, None, self.system)
        else:
            text = self.tokenizer.apply_chat_template(inputs, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        prompt_tokens = int(ids["input_ids"].shape[1])
        if prompt_tokens + max_new_tokens > self.max_context:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it exceeds the model's"
                f" context of {self.max_context} tokens"
            )
        sampling = temperature > 0
        kwargs = {"do_sample": sampling, "max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        started = time.perf_counter()
        # One generation at a time: PEFT's active adapter is model state, and CPU threads are shared.
        with self.lock, torch.inference_mode():
            if self.adapters:
                self.model.set_adapter(adapter or self.adapters[0])
            output = self.model.generate(**ids, **kwargs)
        new = output[0, prompt_tokens:].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if eos in new:
            new, finish = new[: new.index(eos)], "stop"
        generated = self.tokenizer.decode(new, skip_special_tokens=True)
        for marker in stop:
            if marker and marker in generated:
                generated, finish = generated[: generated.index(marker)], "stop"
        return {
            "generated_text": generated,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(new),
            "finish_reason": finish,
            "adapter": (adapter or self.adapters[0]) if self.adapters else None,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
        }


def load(model_dir: str | os.PathLike[str] | None = None, base_model: str | None = None) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir or os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist (set SM_MODEL_DIR)")
    root = _unpack(model_dir)
    adapters = _adapter_folders(root)
    if adapters:
        base = base_model or os.environ.get("LLMOPS_BASE_MODEL") or _base_of(next(iter(adapters.values())))
        if not base or not (Path(base) / "config.json").is_file():
            raise ModelLoadError(
                f"the base model of the adapters in {root} is {base!r}, not a model folder; set LLMOPS_BASE_MODEL"
            )
    else:
        base = str(root)
    tokenizer_dir = root if (root / "tokenizer_config.json").is_file() else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    # The system message training data carried (the prompt template's); plain-text inputs get it.
    system = os.environ.get("LLMOPS_SYSTEM_PROMPT") or None
    max_context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return LoadedModel(model, tokenizer, tuple(adapters), system, max_context)
