"""The curation pipeline as stages over URIs: what each ``llm_data_prep`` task calls.

A stage reads its input records from a URI, applies one transform, writes its output to the
run's own folder (``runs/llm_data_prep/<run>/<stage>.jsonl``) and returns a small dict (URI,
count, stats) for XCom. Re-running a stage overwrites only its own output. A record a stage
drops (empty, duplicate, over-length) is named with its reason in ``<stage>.dropped.jsonl``;
``publish`` refuses unless every record read is either published or in those reports, and lists
the drops in the manifest. Nothing is written under ``datasets/`` except by ``publish``, and only
after validation passed.

``curate()`` runs all stages in one process: the CLI and the tests use it.

    python -m llmops.data.stages [RAW_URI]     # curate into the configured store
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from functools import cache

from llmops import storage
from llmops.config import PROJECT_ROOT, DataConfig, Settings, get_settings
from llmops.data import token_profile, transforms, versioning
from llmops.data.corpus import build_in_fresh_interpreter
from llmops.data.ingest import read_raw
from llmops.data.records import DataQualityError, normalized_key
from llmops.data.validation import validate_records
from llmops.prompts import PromptCatalogError, load_registered, load_template
from llmops.runs import run_folder
from serving.pii import PII_REGEX_LIST

DAG_ID = "llm_data_prep"
BUNDLED_SOURCE = f"python-docs:{platform.python_version()}"


def _apply(
    name: str, in_uri: str, run_uri: str, fn: Callable[[list[dict]], tuple[list[dict], dict]], options=None
) -> dict:
    """Run one transform. The records it drops go to ``<run>/<name>.dropped.jsonl`` (the stats
    keep its URI and count, not the list: XCom is for small values); ``publish`` gathers them."""
    records = storage.read_jsonl(in_uri, options)
    out, stats = fn(records)
    drops = stats.pop("drops", None)
    if drops is not None:
        report_uri = storage.join(run_uri, f"{name}.dropped.jsonl")
        storage.write_jsonl(report_uri, drops, options)
        stats["drop_report"] = {"uri": report_uri, "records": len(drops)}
    if len(out) + len(drops or ()) != len(records):
        raise RuntimeError(
            f"stage {name}: {len(records)} records in, {len(out)} out and {len(drops or ())} reported dropped"
        )
    out_uri = storage.join(run_uri, f"{name}.jsonl")
    storage.write_jsonl(out_uri, out, options)
    return {"uri": out_uri, "count": len(out), "stats": stats}


def ingest(data: DataConfig, run_uri: str, options: dict | None = None, raw_options: dict | None = None) -> dict:
    """Read the raw data named by ``data.raw_uri`` or, when it is unset, write the bundled corpus
    (Python's own documentation) as raw JSON lines first and read that."""

    raw_uri = storage.to_uri(data.raw_uri) if data.raw_uri else None
    if raw_uri is None:
        raw_uri = storage.join(run_uri, "raw", "python_docs.jsonl")
        storage.write_bytes(raw_uri, build_in_fresh_interpreter(), options)
        raw_options = options
    records = read_raw(raw_uri, raw_options)
    out_uri = storage.join(run_uri, "ingested.jsonl")
    storage.write_jsonl(out_uri, records, options)
    source = BUNDLED_SOURCE if data.raw_uri is None else raw_uri
    return {
        "uri": out_uri,
        "count": len(records),
        "stats": {"source": source, "raw_uri": raw_uri, "records": len(records)},
    }


def clean(data: DataConfig, in_uri: str, run_uri: str, options: dict | None = None) -> dict:
    return _apply("cleaned", in_uri, run_uri, lambda rs: transforms.clean(rs, data.max_empty_fraction), options)


def deduplicate(data: DataConfig, in_uri: str, run_uri: str, options: dict | None = None) -> dict:
    return _apply(
        "deduplicated", in_uri, run_uri, lambda rs: transforms.deduplicate(rs, data.max_duplicate_fraction), options
    )


def scrub_pii(data: DataConfig, in_uri: str, run_uri: str, options: dict | None = None) -> dict:
    return _apply("scrubbed", in_uri, run_uri, lambda rs: transforms.scrub_pii(rs, data.scrub_pii), options)


def format_records(
    data: DataConfig, in_uri: str, run_uri: str, options: dict | None = None, tracking_uri: str | None = None
) -> dict:
    """Render instructions with ``data.template``: from the MLflow prompt registry (alias
    ``production``) when ``tracking_uri`` is given, as pipelines do, else from the catalog files."""

    try:
        template = load_registered(tracking_uri, data.template) if tracking_uri else load_template(data.template)
    except PromptCatalogError as exc:
        raise DataQualityError(str(exc)) from None
    if template.task != "instruction":
        raise DataQualityError(f"template {template.ref} is a {template.task!r} template, not an instruction template")
    default_source = BUNDLED_SOURCE if data.raw_uri is None else storage.to_uri(data.raw_uri)
    return _apply(
        "formatted", in_uri, run_uri, lambda rs: transforms.format_records(rs, template, default_source), options
    )


def split(data: DataConfig, in_uri: str, run_uri: str, options: dict | None = None) -> dict:
    fractions = {"train": data.split.train, "validation": data.split.validation, "test": data.split.test}
    return _apply(
        "split",
        in_uri,
        run_uri,
        lambda rs: transforms.assign_splits(rs, fractions, data.split.salt, data.split.respect_source_split),
        options,
    )


@cache
def _token_counter(model_dir: str) -> token_profile.ChatTokenCounter:
    return token_profile.ChatTokenCounter(model_dir)


def profile_tokens(
    data: DataConfig,
    base_model: str,
    models_cache: str,
    in_uri: str,
    run_uri: str,
    options: dict | None = None,
    store_uri: str | None = None,
) -> dict:
    """Token lengths of every record with the base model's tokenizer: the local model folder, or
    on a worker without it (MWAA) the tokenizer files of the copy staged in ``store_uri``."""
    counter = _token_counter(str(token_profile.tokenizer_folder(base_model, models_cache, store_uri, options)))

    def apply(records: list[dict]) -> tuple[list[dict], dict]:
        out, stats = token_profile.profile_tokens(
            records, counter.count, data.max_tokens, data.over_length, data.max_over_length_fraction, counter.truncate
        )
        return out, {**stats, "tokenizer": base_model}

    return _apply("profiled", in_uri, run_uri, apply, options)


def validate(data: DataConfig, in_uri: str, run_uri: str, options: dict | None = None) -> dict:
    """Run the expectation suite. Result and Data Docs go to ``<run>/validation/`` either way."""
    import pandas as pd

    records = storage.read_jsonl(in_uri, options)
    splits_per_prompt = transforms.prompt_split_counts(records)
    frame = pd.DataFrame(
        {
            "id": [r.get("id") for r in records],
            "meta": [
                json.dumps(r["meta"], ensure_ascii=False, sort_keys=True) if r.get("meta") else None for r in records
            ],
            "prompt": [r.get("prompt") for r in records],
            "response": [r.get("response") for r in records],
            "source": [r.get("source") for r in records],
            "split": [r.get("split") for r in records],
            "n_tokens": [r.get(token_profile.N_TOKENS) for r in records],
            "prompt_splits": [splits_per_prompt[normalized_key(r["prompt"])] for r in records],
        }
    )
    outcome = validate_records(
        frame,
        data.expectation_suite,
        {
            "max_tokens": data.max_tokens,
            "min_records": 3 * data.min_records_per_split,
            "pii_regex_list": PII_REGEX_LIST,
        },
        storage.join(run_uri, "validation"),
        options,
    )
    return {"uri": in_uri, "count": len(records), "stats": outcome.summary()}


def publish(
    settings: Settings,
    data: DataConfig,
    in_uri: str,
    validation: dict,
    stage_stats: dict,
    lineage: dict,
    options: dict | None = None,
) -> dict:
    """Write the validated records as a dataset version (or find it already there)."""
    if not validation.get("success"):
        raise DataQualityError("refusing to publish: the dataset did not pass validation")
    records = storage.read_jsonl(in_uri, options)
    dropped = drop_report(stage_stats, options)
    read = stage_stats["ingest"]["records"]
    if read != len(records) + len(dropped):
        raise DataQualityError(
            f"refusing to publish: {read} records were read, {len(records)} are to be published and {len(dropped)} "
            f"were reported dropped; {read - len(records) - len(dropped)} record(s) vanished without a reason"
        )
    manifest_fields = {
        "source_uris": sorted({stage_stats["ingest"]["source"], stage_stats["ingest"]["raw_uri"]}),
        "validation": validation,
        "stages": stage_stats,
        "config": data.model_dump(),
        "lineage": {"git_sha": git_sha(), **lineage},
        "records": {"read": read, "published": len(records), "dropped": len(dropped)},
        "dropped": {
            "by_reason": dict(sorted(Counter(f"{d['stage']}: {d['reason']}" for d in dropped).items())),
            "records": dropped,
        },
    }
    published = versioning.publish(records, settings.datasets_uri(), data.dataset_name, manifest_fields, options)
    manifest = storage.read_json(published.manifest_uri, options)
    return {
        "name": published.name,
        "version": published.version,
        "uri": published.uri,
        "manifest_uri": published.manifest_uri,
        "created": published.created,
        "counts": manifest["counts"],
        "validation_result_uri": manifest["validation"]["result_uri"],
        "data_docs_uri": manifest["validation"]["data_docs_uri"],
    }


def drop_report(stage_stats: dict[str, dict], options: dict | None = None) -> list[dict]:
    """Every record the stages dropped, with the stage and the reason, in stage order."""
    dropped: list[dict] = []
    for stats in stage_stats.values():
        if report := stats.get("drop_report"):
            dropped += storage.read_jsonl(report["uri"], options)
    return dropped


@cache
def git_sha() -> str:
    """The code's commit: ``LLMOPS_GIT_SHA`` where there is no checkout (MWAA), else git's."""
    if sha := os.environ.get("LLMOPS_GIT_SHA"):
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def curate(
    settings: Settings, data: DataConfig | None = None, run_id: str | None = None, lineage: dict | None = None
) -> dict:
    """Every stage in order, in this process. Returns what ``publish`` returns."""
    data = data or settings.data
    run_uri = run_folder(settings, run_id or f"local__{uuid.uuid4().hex[:12]}")
    stats: dict[str, dict] = {}
    step = ingest(data, run_uri)
    stats["ingest"] = step["stats"]
    for name, stage in (
        ("clean", clean),
        ("deduplicate", deduplicate),
        ("scrub_pii", scrub_pii),
        ("format", format_records),
        ("split", split),
    ):
        step = stage(data, step["uri"], run_uri)
        stats[name] = step["stats"]
    step = profile_tokens(
        data, settings.models.base, settings.models.cache_dir, step["uri"], run_uri, store_uri=settings.store_uri
    )
    stats["profile_tokens"] = step["stats"]
    checked = validate(data, step["uri"], run_uri)
    return publish(settings, data, checked["uri"], checked["stats"], stats, lineage or {"run_uri": run_uri})


def main(argv: list[str]) -> int:
    settings = get_settings()
    data = settings.data.model_copy(update={"raw_uri": argv[0]}) if argv else settings.data
    try:
        result = curate(settings, data)
    except DataQualityError as exc:
        print(f"curation failed: {exc}", file=sys.stderr)
        return 1
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
