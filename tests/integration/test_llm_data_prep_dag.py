"""llm_data_prep end to end with dag.test() on the embedded stack (SQLite, local store)."""

from __future__ import annotations

import pytest

from devtools.demo import return_value
from llmops import storage
from llmops.config import get_settings
from tests.dagruns import parsed_dag, task_states
from tests.datagen import good_records, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.model]


@pytest.fixture(scope="module")
def dag(airflow_db, tmp_path_factory):
    """The DAG parsed against a store of this module's own. One store for all the tests here:
    an Asset's URI is the dataset folder, and Airflow keeps one URI per Asset name."""
    with parsed_dag("llm_data_prep", LLMOPS_HOME=str(tmp_path_factory.mktemp("home"))) as dag:
        yield dag


def _versions(settings) -> list[str]:
    dataset = storage.join(settings.datasets_uri(), settings.data.dataset_name)
    return sorted(c for c in storage.list_dir(dataset) if not c.startswith("."))


def test_bundled_corpus_is_curated_validated_and_published_once(dag):
    settings = get_settings()
    before = _versions(settings)
    first = dag.test()
    assert first.state == "success", task_states(first)
    published = return_value(first, "publish_version")
    assert published["created"] is True
    assert _versions(settings) == sorted([*before, published["version"]])
    manifest = storage.read_json(published["manifest_uri"])
    assert any(uri.startswith("python-docs:") for uri in manifest["source_uris"])
    assert min(manifest["counts"].values()) > 100
    assert manifest["validation"]["success"] and storage.exists(manifest["validation"]["data_docs_uri"])
    assert manifest["lineage"]["dag_id"] == "llm_data_prep" and manifest["lineage"]["run_id"] == first.run_id
    assert task_states(first)["announce_dataset"] == "success"

    second = dag.test()
    assert second.state == "success", task_states(second)
    again = return_value(second, "publish_version")
    assert again["version"] == published["version"] and again["created"] is False
    assert task_states(second)["announce_dataset"] == "skipped", "an unchanged dataset must not trigger training"
    assert _versions(settings) == sorted([*before, published["version"]])


def test_bad_input_fails_at_ingest_and_writes_no_version(dag, tmp_path):
    raw = write_jsonl(tmp_path / "cut.jsonl", good_records(10))
    raw.write_bytes(raw.read_bytes()[:-20])
    before = _versions(get_settings())
    run = dag.test(run_conf={"raw_uri": str(raw)})
    states = task_states(run)
    assert run.state == "failed"
    assert states["ingest_raw"] == "failed"
    assert states["publish_version"] in ("upstream_failed", None)
    assert _versions(get_settings()) == before


def test_user_data_with_params_from_the_trigger_form(dag, tmp_path):
    raw = write_jsonl(tmp_path / "mine.jsonl", good_records(30))
    run = dag.test(run_conf={"raw_uri": str(raw), "template": "plain_instruction", "over_length": "fail"})
    assert run.state == "success", task_states(run)
    published = return_value(run, "publish_version")
    assert sum(published["counts"].values()) == 30
    train = storage.read_jsonl(storage.join(published["uri"], "train.jsonl"))
    assert {r["template"] for r in train} == {"plain_instruction@1"}
