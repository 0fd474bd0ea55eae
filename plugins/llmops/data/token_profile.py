"""Token-length profile with the base model's tokenizer, and the over-length policy.

Lengths are counted on the exact chat text training will see (``training.chat_format``), so a
record that fits here fits there. Counting needs neither torch nor transformers (Airflow workers
on Amazon MWAA have neither): the base model's ``tokenizer.json`` runs with ``tokenizers`` (the
library transformers' fast tokenizers wrap) and its chat template with ``jinja2``, set up as
transformers' ``apply_chat_template`` sets it up; ``tests/unit/data/test_token_profile.py`` checks
the counts against transformers. A worker without the base model fetches just its tokenizer files
from the copy staged in the store for SageMaker (``tokenizer_folder``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from llmops import storage
from llmops.data.records import SPLITS, DataQualityError, drop, examples
from llmops.models import ModelNotFoundError, resolve_model
from llmops.staging import STAGED_MARKER, base_model_uri
from training.chat_format import render

N_TOKENS = "_n_tokens"


def _quantiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def q(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]

    return {
        "count": len(ordered),
        "min": ordered[0],
        "p50": q(0.5),
        "p95": q(0.95),
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def profile_tokens(
    records: list[dict],
    count_tokens: Callable[[list[dict]], list[int]],
    max_tokens: int,
    over_length: str = "drop",
    max_over_length_fraction: float = 1.0,
    truncate: Callable[[dict, int], dict] | None = None,
) -> tuple[list[dict], dict]:
    """Count tokens per record and apply the over-length policy (``drop``, ``truncate`` or
    ``fail``). Too many over-length records fail whatever the policy: they mean the data or
    ``max_tokens`` is wrong, and silently dropping most of a dataset hides that."""
    lengths = count_tokens(records)
    over = [dict(r, **{N_TOKENS: n}) for r, n in zip(records, lengths, strict=True) if n > max_tokens]
    total = len(records)
    if over and over_length == "fail":
        raise DataQualityError(
            f"{len(over)} of {total} records exceed max_tokens={max_tokens} and the policy is 'fail': "
            f"e.g. {examples(over)} ({', '.join(str(r[N_TOKENS]) for r in over[:3])} tokens)"
        )
    if over and len(over) / total > max_over_length_fraction:
        raise DataQualityError(
            f"too many over-length records: {len(over)} of {total} ({len(over) / total:.0%}) exceed "
            f"max_tokens={max_tokens}, more than the allowed {max_over_length_fraction:.0%}: e.g. {examples(over)} "
            f"({', '.join(str(r[N_TOKENS]) for r in over[:3])} tokens); raise data.max_tokens or fix the data"
        )

    kept, truncated, drops = [], 0, []
    for record, n in zip(records, lengths, strict=True):
        if n <= max_tokens:
            kept.append(dict(record, **{N_TOKENS: n}))
        elif over_length == "truncate" and truncate is not None:
            shortened = truncate(record, max_tokens)
            if shortened is None:
                reason = "longer than max_tokens, and the prompt alone leaves no room to truncate the response into"
                drops.append(drop(record, "profile_tokens", reason, n_tokens=n, max_tokens=max_tokens))
                continue
            kept.append(shortened)
            truncated += 1
        else:
            drops.append(drop(record, "profile_tokens", "longer than max_tokens", n_tokens=n, max_tokens=max_tokens))
    if not kept:
        raise DataQualityError(f"every one of the {total} records exceeds max_tokens={max_tokens}")
    stats = {
        "max_tokens": max_tokens,
        "over_length": len(over),
        "policy": over_length,
        "dropped": len(drops),
        "truncated": truncated,
        "all": _quantiles([r[N_TOKENS] for r in kept]),
        "by_split": {s: _quantiles([r[N_TOKENS] for r in kept if r.get("split") == s]) for s in SPLITS},
        "drops": drops,
    }
    return kept, stats


# What a tokenizer needs from a model folder; the weights are not among them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    # Special tokens are saved as strings or as AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict) -> str | None:
    # transformers' order: chat_template.jinja, else tokenizer_config.json's "chat_template" (a
    # string, or named templates of which "default" is the one used).
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


class ChatTokenizer:
    """A model folder's ``tokenizer.json`` and chat template without transformers, offering what
    ``training.chat_format.render`` and :class:`ChatTokenCounter` use of a transformers tokenizer."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        folder = Path(model_dir)
        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = (
            json.loads((folder / "tokenizer_config.json").read_text())
            if (folder / "tokenizer_config.json").is_file()
            else {}
        )
        legacy = folder / "special_tokens_map.json"
        special = {**config, **(json.loads(legacy.read_text()) if legacy.is_file() else {})}
        self.special_tokens_map = {k: _token_text(special[k]) for k in _SPECIAL_TOKENS if special.get(k)}
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.chat_template = _chat_template(folder, config)
        # transformers skips this clean-up for BPE models: it would delete real spaces before punctuation.
        self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and type(self.backend.model).__name__ != "BPE"
        self._template: Any = None

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        if tokenize:
            raise ValueError("ChatTokenizer.apply_chat_template renders text only (tokenize=False)")
        if self._template is None:
            self._template = _compile(self.chat_template)
        # As transformers: keys set to None are dropped, and the special tokens are template variables.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as it stands: special-token text in it counts as that token, and
        nothing (no BOS, no EOS) is added."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        text = self.backend.decode(ids, skip_special_tokens=False)
        if self._clean_up:
            for spaced, joined in (
                (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
            ):  # fmt: skip
                text = text.replace(spaced, joined)
        return text


def _compile(template: str):
    """The chat template compiled the way transformers compiles it (sandboxed, ``trim_blocks``,
    ``lstrip_blocks``, loop controls, its ``tojson``, ``raise_exception`` and ``strftime_now``;
    ``{% generation %}`` blocks render their content)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class _TransformersChatTokenizer:
    """A folder without ``tokenizer.json`` (a sentencepiece ``tokenizer.model`` only): transformers
    converts it, so this one path still needs transformers."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)  # nosec B615 - a folder
        self.chat_template = self.tokenizer.chat_template
        self.eos_token = self.tokenizer.eos_token

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class ChatTokenCounter:
    """Counts and truncates records with a model folder's tokenizer and the shared chat format."""

    def __init__(self, model_dir: str):
        has_json = (Path(model_dir) / "tokenizer.json").is_file()
        self.tokenizer = ChatTokenizer(model_dir) if has_json else _TransformersChatTokenizer(model_dir)

    def _text(self, record: dict, response: str | None = None) -> str:
        return render(
            self.tokenizer, record["prompt"], record["response"] if response is None else response, record.get("system")
        )

    def count(self, records: list[dict]) -> list[int]:
        return [len(ids) for ids in self.tokenizer.encode([self._text(r) for r in records])]

    def truncate(self, record: dict, max_tokens: int) -> dict | None:
        """Shorten the response so the whole example fits; None when the prompt alone does not."""
        overhead = self.count([dict(record, response="")])[0]
        budget = max_tokens - overhead
        if budget < 8:
            return None
        ids = self.tokenizer.encode([record["response"]])[0]
        response = self.tokenizer.decode(ids[:budget]).rstrip()
        shortened = dict(record, response=response)
        n = self.count([shortened])[0]
        while n > max_tokens and budget > 8:
            # Decoding then re-encoding can merge tokens differently; trim until it fits.
            budget -= max(1, n - max_tokens)
            shortened["response"] = self.tokenizer.decode(ids[:budget]).rstrip()
            n = self.count([shortened])[0]
        return dict(shortened, **{N_TOKENS: n}) if n <= max_tokens else None


# -- where the tokenizer files come from ------------------------------------------------------


def tokenizer_folder(
    name: str, cache_dir: str | os.PathLike[str], store_uri: str | None = None, storage_options: dict | None = None
) -> Path:
    """A local folder holding model ``name``'s tokenizer: the model's own folder when this machine
    has it; else, with ``store_uri``, the tokenizer files of the copy staged in the store for
    SageMaker (``base-models/<key>/``, see ``llmops.backends.training.sagemaker.ensure_model_staged``),
    fetched into ``<cache_dir>/tokenizers/<key>/`` (again only when the staged files change), or
    that local copy when the store has none; else the converted built-in (converting needs torch
    and transformers)."""

    try:
        return resolve_model(name, cache_dir, convert=False)
    except ModelNotFoundError:
        if store_uri is None:
            return resolve_model(name, cache_dir)
    fetched, staged_uri = _fetch_staged_tokenizer(name, cache_dir, store_uri, storage_options)
    if fetched is not None:
        return fetched
    try:
        return resolve_model(name, cache_dir)
    except (ModelNotFoundError, ImportError) as exc:
        raise ModelNotFoundError(
            f"no tokenizer for model {name!r}: not on this machine ({exc}) and not staged at {staged_uri};"
            f" stage it once from a machine that has it: python -m devtools.aws stage-model {name}"
        ) from None


def _fetch_staged_tokenizer(
    name: str, cache_dir: str | os.PathLike[str], store_uri: str, storage_options: dict | None
) -> tuple[Path | None, str]:

    uri = base_model_uri(store_uri, name)
    marker_uri = storage.join(uri, STAGED_MARKER)
    target = Path(cache_dir) / "tokenizers" / uri.rstrip("/").rsplit("/", 1)[-1]
    record = target / STAGED_MARKER
    if not storage.exists(marker_uri, storage_options):
        return (target if record.is_file() else None), uri
    hashes = storage.read_json(marker_uri, storage_options)["files"]
    wanted = {f: hashes[f] for f in TOKENIZER_FILES if f in hashes}
    if "tokenizer.json" not in wanted:
        return None, uri
    if record.is_file() and json.loads(record.read_text()) == wanted:
        return target, uri
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: workers fetching at once never see half a folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for file, digest in wanted.items():
            data = storage.read_bytes(storage.join(uri, file), storage_options)
            if hashlib.sha256(data).hexdigest() != digest:
                raise ModelNotFoundError(
                    f"{storage.join(uri, file)} does not match its hash in {marker_uri}; stage the model again"
                )
            (staging / file).write_bytes(data)
        (staging / STAGED_MARKER).write_text(json.dumps(wanted, sort_keys=True))
        os.chmod(staging, 0o755)  # nosec B103 - a folder: readable tokenizer files, nothing secret
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    except OSError:
        # Another worker renamed its copy into place first; that copy is as good as this one.
        if not (record.is_file() and json.loads(record.read_text()) == wanted):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, uri
