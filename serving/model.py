"""Loading a fine-tuned model for serving, and generating with it: the "load" and "predict" of the
SageMaker inference toolkit's four functions (``serving/app.py`` holds "decode" and "encode").

The model folder (``SM_MODEL_DIR``, default ``/opt/ml/model``) is what training wrote, or a folder
holding its ``model.tar.gz``:

* a PEFT adapter at the top level (``adapter_config.json``) is served as the adapter ``default``;
* more adapters may sit in ``adapters/<name>/``; a request picks one by name;
* a full model (``config.json`` without an adapter) is served as it is.

The base model is ``LLMOPS_BASE_MODEL`` when set, else the ``base_model`` recorded in the
adapters' ``training_config.json``; ``LLMOPS_SYSTEM_PROMPT`` is put in front of plain-text inputs
(chat inputs bring their own). Everything loads once, at start-up.

Nothing is loaded from outside the model folder and the allowed base-model folders, and nothing is
downloaded: the tarball is unpacked by ``training.archive.safe_extract`` (no member may leave the
folder, no links, size and member limits), adapter names are plain identifiers, adapter folders are
real folders inside the model folder, and a base model named by an adapter must be a folder under
``LLMOPS_BASE_MODEL_ROOTS`` (``os.pathsep``-separated; default: the models cache
``LLMOPS_MODELS_DIR``, the state folder ``LLMOPS_HOME`` and SageMaker's
``/opt/ml/additional-model-data-sources``), never a Hugging Face Hub id. A model that breaks a
rule is refused with ``ModelLoadError`` saying what and where.
"""

from __future__ import annotations

import json
import os
import queue
import re
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from training.archive import ArchiveError, model_archive_limits, safe_extract
from training.chat_format import render

DEFAULT_ADAPTER = "default"
# PEFT keys modules by adapter name: a dot or a slash would break them, and names reach logs and URLs.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SAGEMAKER_MODEL_SOURCES = "/opt/ml/additional-model-data-sources"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ModelLoadError(RuntimeError):
    """The model folder cannot be served; the message says what is missing."""


def _unpack(model_dir: Path) -> Path:
    tarball = model_dir / "model.tar.gz"
    if (model_dir / "adapter_config.json").is_file() or (model_dir / "config.json").is_file():
        return model_dir
    if not tarball.is_file():
        raise ModelLoadError(f"{model_dir} holds no adapter_config.json, config.json or model.tar.gz")
    if not os.access(model_dir, os.W_OK):
        target = Path(tempfile.mkdtemp(prefix="llmops-model-")) / "model"
    else:
        # Named after the tarball's size and time: a restart, or a second server of the same model,
        # reuses the folder (it only ever appears complete), and a new tarball gets a new folder.
        stamp = tarball.stat()
        target = model_dir / f"unpacked-{stamp.st_size:x}-{stamp.st_mtime_ns:x}"
        if target.is_dir() and not target.is_symlink():
            return target
    try:
        return safe_extract(tarball, target, **model_archive_limits())
    except ArchiveError as exc:
        raise ModelLoadError(str(exc)) from None
    except FileExistsError:
        if target.is_dir() and not target.is_symlink():
            return target  # another server of this model unpacked it first
        raise ModelLoadError(f"{target} exists and is not a folder: cannot unpack {tarball} there") from None


def _inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _check_files(root: Path, folder: Path) -> None:
    """The files the server reads from ``folder`` must be inside the model folder, links included."""
    for entry in folder.iterdir():
        if entry.is_symlink() and not _inside(root, entry):
            raise ModelLoadError(
                f"{entry} is a symbolic link to {entry.resolve()}, outside the model folder {root}:"
                " the server loads only files inside it"
            )


def _check_adapter(root: Path, name: str, folder: Path) -> None:
    where = folder.relative_to(root) if folder != root else Path(".")
    if not ADAPTER_NAME.fullmatch(name):
        raise ModelLoadError(
            f"adapter folder {where} in {root}: {name!r} is not a valid adapter name (letters, digits, '_' and '-',"
            " at most 64, not starting with '-')"
        )
    if folder.is_symlink() or not folder.is_dir() or not _inside(root, folder):
        raise ModelLoadError(
            f"adapter {name!r}: {folder} is a link or not a folder inside the model folder {root}; adapters load"
            " only from real folders inside it"
        )
    if not (folder / "adapter_config.json").is_file():
        raise ModelLoadError(f"adapter {name!r}: {folder} holds no adapter_config.json")
    if not any((folder / weights).is_file() for weights in ADAPTER_WEIGHTS):
        raise ModelLoadError(f"adapter {name!r}: {folder} holds no {' or '.join(ADAPTER_WEIGHTS)}")
    _check_files(root, folder)


def _adapter_folders(root: Path) -> dict[str, Path]:
    """The adapters to serve, each checked: ``default`` at the top level, then ``adapters/<name>/``."""
    _check_files(root, root)
    adapters = {}
    if (root / "adapter_config.json").is_file():
        _check_adapter(root, DEFAULT_ADAPTER, root)
        adapters[DEFAULT_ADAPTER] = root
    extra = root / "adapters"
    if extra.is_symlink() or (extra.exists() and not extra.is_dir()):
        raise ModelLoadError(f"{extra} is a link or a file: adapters load only from a real folder inside {root}")
    if extra.is_dir():
        for folder in sorted(extra.iterdir()):
            if not folder.is_symlink() and folder.is_file():
                continue  # a README or the like next to the adapters
            if folder.name in adapters:
                raise ModelLoadError(f"adapter {folder.name!r}: {folder} clashes with the adapter at the top of {root}")
            _check_adapter(root, folder.name, folder)
            adapters[folder.name] = folder
    return adapters


def _base_of(adapter_dir: Path) -> str | None:
    config = adapter_dir / "training_config.json"
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text()).get("base_model")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{config} is not a JSON object: {exc}") from None
    if base is not None and not isinstance(base, str):
        raise ModelLoadError(f"{config}: base_model must be a string, not {base!r}")
    return base or None


def base_model_roots() -> list[Path]:
    """The folders an adapter's recorded base model may come from (see the module's docstring)."""
    configured = os.environ.get("LLMOPS_BASE_MODEL_ROOTS", "").strip()
    if configured:
        return [Path(p).expanduser() for p in configured.split(os.pathsep) if p.strip()]
    home = Path(os.environ.get("LLMOPS_HOME") or PROJECT_ROOT / ".llmops")
    models = Path(os.environ.get("LLMOPS_MODELS_DIR") or PROJECT_ROOT / ".llmops" / "models")
    return [models, home, Path(SAGEMAKER_MODEL_SOURCES)]


def _allowed_base(name: str, config: Path, roots: list[Path]) -> Path:
    """The folder of base model ``name`` recorded in ``config``: an absolute folder under one of
    ``roots``, or a name or relative path found under one; ``ModelLoadError`` otherwise."""
    candidates = [Path(name)] if Path(name).is_absolute() else [root / name for root in roots]
    for candidate in candidates:
        if (candidate / "config.json").is_file() and any(_inside(root, candidate) for root in roots if root.is_dir()):
            return candidate.resolve()
    allowed = os.pathsep.join(str(r) for r in roots)
    if (
        not Path(name).is_absolute()
        and re.fullmatch(r"[\w.-]+/[\w.-]+", name)
        and not any(c.exists() for c in candidates)
    ):
        why = "looks like a Hugging Face Hub id, and the server never downloads models"
    elif Path(name).is_absolute() and (Path(name) / "config.json").is_file():
        why = "is a model folder outside the allowed base-model folders"
    else:
        why = "is not a model folder (with a config.json) under the allowed base-model folders"
    raise ModelLoadError(
        f"the base model {name!r} named by {config} {why} ({allowed}); set LLMOPS_BASE_MODEL to the base model's"
        " folder, or add its parent folder to LLMOPS_BASE_MODEL_ROOTS"
    )


def _base_model(root: Path, adapters: dict[str, Path], given: str | None) -> str:
    """The base model's folder: the one given (argument or ``LLMOPS_BASE_MODEL``), else the one
    every adapter's ``training_config.json`` names, within the allowed roots."""
    if given:
        if not (Path(given) / "config.json").is_file():
            raise ModelLoadError(
                f"the base model {given!r} (LLMOPS_BASE_MODEL or load's base_model) is not a model folder with a"
                " config.json"
            )
        return given
    roots = base_model_roots()
    bases = {}
    for name, folder in adapters.items():
        recorded = _base_of(folder)
        if recorded is not None:
            bases[name] = _allowed_base(recorded, folder / "training_config.json", roots)
    if not bases:
        raise ModelLoadError(
            f"the adapters in {root} record no base model (training_config.json); set LLMOPS_BASE_MODEL"
        )
    if len(set(bases.values())) > 1:
        named = ", ".join(f"{name}: {path}" for name, path in bases.items())
        raise ModelLoadError(f"the adapters in {root} name different base models ({named}); serve them separately")
    return str(next(iter(bases.values())))


@dataclass(frozen=True)
class Prepared:
    """One request, tokenized and checked against the model's context."""

    ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    adapter: str | None

    @property
    def group(self) -> tuple:
        """Requests with the same group can share one ``generate`` call."""
        sampling = (self.temperature, self.top_p) if self.temperature > 0 else None
        return (self.adapter, sampling)


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    adapters: tuple[str, ...]
    system: str | None
    max_context: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(
        self,
        inputs: str | list[dict],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | tuple[str, ...] = (),
        adapter: str | None = None,
    ) -> Prepared:
        """The request tokenized; ``ValueError`` when the prompt and answer do not fit the context, or the
        adapter is not one this model serves."""
        if adapter is not None and adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none: this model has no adapters"
            raise ValueError(f"unknown adapter {adapter!r} (known: {known})")
        if isinstance(inputs, str):
            text = render(self.tokenizer, inputs, None, self.system)
        else:
            text = self.tokenizer.apply_chat_template(inputs, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + max_new_tokens > self.max_context:
            raise ValueError(
                f"the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the model's"
                f" context of {self.max_context} tokens"
            )
        adapter = (adapter or self.adapters[0]) if self.adapters else None
        return Prepared(tuple(ids), max_new_tokens, temperature, top_p, tuple(stop), adapter)

    def generate_batch(self, requests: list[Prepared]) -> list[dict]:
        """Answers to requests of one ``group``, generated together: prompts padded on the left, each
        row stopping at its own ``max_new_tokens`` or end of sequence."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        if len({r.group for r in requests}) != 1:
            raise ValueError("a batch needs one adapter and one sampling setting")
        first = requests[0]
        pad = self.tokenizer.pad_token_id
        width = max(len(r.ids) for r in requests)
        input_ids = torch.tensor([[pad] * (width - len(r.ids)) + list(r.ids) for r in requests])
        attention = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in requests])
        limits = torch.tensor([width + r.max_new_tokens for r in requests])

        class RowLimits(StoppingCriteria):  # a row is done at its own max_new_tokens
            def __call__(self, ids, scores, **kwargs):
                return ids.shape[1] >= limits.to(ids.device)

        kwargs = {
            "do_sample": first.temperature > 0,
            "max_new_tokens": max(r.max_new_tokens for r in requests),
            "pad_token_id": pad,
            "stopping_criteria": StoppingCriteriaList([RowLimits()]),
        }
        if first.temperature > 0:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
        # One generation at a time: PEFT's active adapter is model state, and CPU threads are shared.
        with self.lock, torch.inference_mode():
            if self.adapters:
                self.model.set_adapter(first.adapter)
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        return [self._answer(r, output[row, width:].tolist()) for row, r in enumerate(requests)]

    def _answer(self, request: Prepared, new: list[int]) -> dict:
        new = new[: request.max_new_tokens]
        eos = self.tokenizer.eos_token_id
        finish = "length"
        if eos in new:
            new, finish = new[: new.index(eos)], "stop"
        generated = self.tokenizer.decode(new, skip_special_tokens=True)
        for marker in request.stop:
            if marker in generated:
                generated, finish = generated[: generated.index(marker)], "stop"
        return {
            "generated_text": generated,
            "prompt_tokens": len(request.ids),
            "completion_tokens": len(new),
            "finish_reason": finish,
            "adapter": request.adapter,
        }

    def generate(
        self,
        inputs: str | list[dict],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | tuple[str, ...] = (),
        adapter: str | None = None,
    ) -> dict:
        """One request on its own (``Batcher`` batches concurrent ones)."""
        started = time.perf_counter()
        answer = self.generate_batch([self.prepare(inputs, max_new_tokens, temperature, top_p, stop, adapter)])[0]
        return {**answer, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


class BatcherStopped(RuntimeError):
    """The batcher takes no more requests (closed, or its thread died)."""


@dataclass
class _Queued:
    request: Prepared
    future: Future
    enqueued: float


class Batcher:
    """Dynamic batching: requests that arrive while the model is busy, or within ``max_wait_ms`` of
    the first, are generated together, up to ``max_batch_size`` of one ``Prepared.group``.

    On a CPU a decoding step of a small model costs about the same for 1 or 8 rows, so batching
    multiplies throughput under concurrent load. ``max_batch_size=1`` serves one request at a time.
    Greedy answers can differ from unbatched ones in the last bits of a logit, rarely in a token.
    """

    def __init__(self, model: LoadedModel, max_batch_size: int = 8, max_wait_ms: float = 5.0):
        if not 1 <= max_batch_size <= 256:
            raise ValueError(f"max_batch_size must be between 1 and 256, not {max_batch_size}")
        if not 0 <= max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms must be between 0 and 1000, not {max_wait_ms}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.batches = 0
        self.requests = 0
        self._queue: queue.Queue[_Queued | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llmops-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Prepared) -> Future:
        """Queue a request; ``BatcherStopped`` once the batcher is closed or has died."""
        future: Future = Future()
        with self._lock:
            if self._closed or not self._thread.is_alive():
                raise BatcherStopped("the model server is shutting down or its generation thread stopped")
            self._queue.put(_Queued(request, future, time.perf_counter()))
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def close(self, timeout: float = 60) -> None:
        """Stop taking requests, answer those queued, then stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)

    def stats(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "batches": self.batches, "requests": self.requests}

    def _collect(self, first: _Queued) -> tuple[list[_Queued], bool]:
        """The first request and those queued behind it; True when the batcher is to stop after."""
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _split(self, batch: list[_Queued]) -> tuple[list[_Queued], list[_Queued]]:
        """The requests that can share one ``generate`` call with the first (same group; the widest
        prompt plus the longest answer within the model's context), and the rest."""
        group = batch[0].request.group
        limit = getattr(self.model, "max_context", None)
        now, later, width, longest = [], [], 0, 0
        for q in batch:
            w, n = max(width, len(q.request.ids)), max(longest, q.request.max_new_tokens)
            if q.request.group == group and (limit is None or not now or w + n <= limit):
                now.append(q)
                width, longest = w, n
            else:
                later.append(q)
        return now, later

    def _run(self) -> None:
        leftover: list[_Queued] = []
        stopping = False
        try:
            while not (stopping and not leftover):
                if leftover:
                    batch, leftover = leftover, []
                else:
                    first = self._queue.get()
                    if first is None:
                        return
                    batch, stopping = self._collect(first)
                now, leftover = self._split(batch)  # the rest is served next, before newer requests
                self._generate(now)
        finally:  # whatever ends this thread, nobody is left waiting
            with self._lock:
                self._closed = True
            stranded = list(leftover)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    stranded.append(item)
            for q in stranded:
                if q.future.set_running_or_notify_cancel():
                    q.future.set_exception(BatcherStopped("the model server stopped before answering"))

    def _generate(self, batch: list[_Queued]) -> None:
        live = [q for q in batch if q.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            answers = self.model.generate_batch([q.request for q in live])
            if len(answers) != len(live):
                raise RuntimeError(f"generate_batch gave {len(answers)} answers to {len(live)} requests")
        except BaseException as exc:  # every caller hears of it; the batcher goes on after an Exception
            for q in live:
                q.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.requests += len(live)
        done = time.perf_counter()
        for q, answer in zip(live, answers, strict=True):
            q.future.set_result({**answer, "batch_size": len(live), "latency_ms": round((done - q.enqueued) * 1000, 1)})


def load(model_dir: str | os.PathLike[str] | None = None, base_model: str | None = None) -> LoadedModel:
    model_dir = Path(model_dir or os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist (set SM_MODEL_DIR)")
    root = _unpack(model_dir)
    adapters = _adapter_folders(root)
    base = _base_model(root, adapters, base_model or os.environ.get("LLMOPS_BASE_MODEL")) if adapters else str(root)
    # The folder is checked before torch is imported: a wrong folder fails in a fraction of a second.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = root if (root / "tokenizer_config.json").is_file() else Path(base)
    # Local files only: a folder missing a file must fail here, not fetch one from the Hub.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)  # nosec B615 - local only
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)  # nosec B615 - local
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0], local_files_only=True)
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name, local_files_only=True)
    model.eval()
    # The system message training data carried (the prompt template's); plain-text inputs get it.
    system = os.environ.get("LLMOPS_SYSTEM_PROMPT") or None
    max_context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return LoadedModel(model, tokenizer, tuple(adapters), system, max_context)
