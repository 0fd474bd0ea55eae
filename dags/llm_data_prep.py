"""
### llm_data_prep: raw text to a curated, validated, versioned instruction dataset

ingest → clean → de-duplicate → scrub PII → format with a prompt template (from the MLflow
prompt registry, after `sync_prompts` registers any catalog change) → split → token profile →
Great Expectations → publish the version (content-addressed, manifest last) → announce it on the
curated-dataset Asset, which schedules `llm_finetune`.

With no `raw_uri`, the bundled corpus (this Python's own documentation) is used. A run whose
data fails any check stops at that task with a message naming the defect and where it is; no
dataset version is written. Re-running on the same input finds the same version, writes nothing,
and skips the announcement.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from llmops.compat import AirflowSkipException
from llmops.config import DataConfig, get_settings
from llmops.data import stages
from llmops.orchestration import (
    curated_dataset_asset,
    data_config_from_params,
    event_recorded,
    fail_without_retry,
    skip_as_done,
    storage_options_for,
)

SETTINGS = get_settings()
CURATED_DATASET = curated_dataset_asset(SETTINGS)


def _data(config: dict) -> DataConfig:
    return DataConfig.model_validate(config["data"])


@dag(
    dag_id="llm_data_prep",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["llmops", "data"],
    default_args={
        "owner": "llmops",
        "retries": 1,
        "retry_delay": timedelta(seconds=30),
        "execution_timeout": timedelta(hours=1),
    },
    params={
        "raw_uri": Param(
            None,
            type=["null", "string"],
            title="Raw data URI",
            description="JSONL, CSV or Parquet file: a local path, file:// or s3:// URI. Empty: the bundled "
            "corpus built from this Python's documentation.",
        ),
        "template": Param(
            SETTINGS.data.template,
            type="string",
            title="Prompt template",
            description="Name of an instruction template in include/prompts/ (loaded from the MLflow prompt "
            "registry by its 'production' alias).",
        ),
        "max_tokens": Param(
            SETTINGS.data.max_tokens,
            type="integer",
            minimum=16,
            title="Max tokens per example",
            description="Longest allowed example (prompt and response in the chat format), in base-model tokens.",
        ),
        "over_length": Param(
            SETTINGS.data.over_length,
            enum=["drop", "truncate", "fail"],
            title="Over-length records",
            description="What to do with examples longer than max tokens.",
        ),
        "scrub_pii": Param(SETTINGS.data.scrub_pii, type="boolean", title="Scrub PII"),
    },
)
def llm_data_prep():
    @task
    @fail_without_retry
    def resolve_config() -> dict:
        context = get_current_context()
        data = data_config_from_params(SETTINGS, dict(context["params"]))
        return {"data": data.model_dump(), "run_uri": stages.run_folder(SETTINGS, context["run_id"])}

    @task
    @fail_without_retry
    def ingest_raw(config: dict) -> dict:
        data = _data(config)
        return stages.ingest(
            data,
            config["run_uri"],
            storage_options_for(SETTINGS.store_uri, SETTINGS),
            storage_options_for(data.raw_uri, SETTINGS),
        )

    def stage_task(task_id: str, stage):
        @task(task_id=task_id)
        @fail_without_retry
        def run_stage(config: dict, upstream: dict) -> dict:
            return stage(
                _data(config), upstream["uri"], config["run_uri"], storage_options_for(SETTINGS.store_uri, SETTINGS)
            )

        return run_stage

    @task
    def sync_prompts() -> dict:
        from llmops.prompts import sync_prompts

        return {name: result.to_dict() for name, result in sync_prompts(SETTINGS.mlflow.tracking_uri).items()}

    @task
    @fail_without_retry
    def format_instructions(config: dict, upstream: dict, prompts: dict) -> dict:
        return stages.format_records(
            _data(config),
            upstream["uri"],
            config["run_uri"],
            storage_options_for(SETTINGS.store_uri, SETTINGS),
            tracking_uri=SETTINGS.mlflow.tracking_uri,
        )

    @task
    @fail_without_retry
    def profile_tokens(config: dict, upstream: dict) -> dict:
        return stages.profile_tokens(
            _data(config),
            SETTINGS.models.base,
            SETTINGS.models.cache_dir,
            upstream["uri"],
            config["run_uri"],
            storage_options_for(SETTINGS.store_uri, SETTINGS),
            store_uri=SETTINGS.store_uri,
        )

    @task
    @fail_without_retry
    def publish_version(config: dict, validated: dict, stage_results: dict[str, dict]) -> dict:
        context = get_current_context()
        return stages.publish(
            SETTINGS,
            _data(config),
            validated["uri"],
            validated["stats"],
            {name: result["stats"] for name, result in stage_results.items()},
            {"dag_id": context["dag"].dag_id, "run_id": context["run_id"], "run_uri": config["run_uri"]},
            storage_options_for(SETTINGS.store_uri, SETTINGS),
        )

    @task(inlets=[CURATED_DATASET], outlets=[CURATED_DATASET])
    def announce_dataset(published: dict) -> dict:
        if not published["created"]:
            raise AirflowSkipException(f"dataset version {published['version']} already exists; nothing new")
        context = get_current_context()
        if event_recorded(context, CURATED_DATASET, version=published["version"]):
            # A re-run: the version was announced, and fine-tuning asked for, once already.
            skip_as_done(context, published, f"dataset version {published['version']} was announced already")
        context["outlet_events"][CURATED_DATASET].extra = {
            "version": published["version"],
            "manifest_uri": published["manifest_uri"],
        }
        return published

    config = resolve_config()
    ingested = ingest_raw(config)
    cleaned = stage_task("clean_text", stages.clean)(config, ingested)
    unique = stage_task("deduplicate", stages.deduplicate)(config, cleaned)
    scrubbed = stage_task("scrub_pii", stages.scrub_pii)(config, unique)
    formatted = format_instructions(config, scrubbed, sync_prompts())
    split = stage_task("split_dataset", stages.split)(config, formatted)
    profiled = profile_tokens(config, split)
    validated = stage_task("validate_dataset", stages.validate)(config, profiled)
    published = publish_version(
        config,
        validated,
        stage_results={
            "ingest": ingested,
            "clean": cleaned,
            "deduplicate": unique,
            "scrub_pii": scrubbed,
            "format": formatted,
            "split": split,
            "profile_tokens": profiled,
        },
    )
    announce_dataset(published)


llm_data_prep()
