"""The evaluation job end to end on a tiny model: base, a fine-tuned candidate and a champion
answer every item through the local backend, each answer is measured, and a re-run reuses it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from llmops import storage
from llmops.backends.training.job import TrainingJobError
from llmops.config import PROJECT_ROOT
from llmops.evaluation import build_items, run_evaluation
from llmops.prompts import load_eval_catalog, load_template

pytestmark = [pytest.mark.integration, pytest.mark.model]

SETTINGS_UPDATE = {"max_test_items": 6, "max_new_tokens": 8, "batch_size": 4, "max_input_tokens": 256}


@pytest.fixture(scope="module")
def candidate(tiny_training_job) -> str:
    """model.tar.gz of a LoRA adapter trained for a few steps on the curated dataset."""
    return tiny_training_job["model_artifact_uri"]


@pytest.fixture
def eval_settings(settings):
    return settings.model_copy(update={"evaluation": settings.evaluation.model_copy(update=SETTINGS_UPDATE)})


def items_for(curated_dataset):
    catalog = load_eval_catalog()
    return build_items(curated_dataset, load_template(catalog.template), catalog, SETTINGS_UPDATE["max_test_items"])


def test_every_model_answers_every_item_and_is_measured(eval_settings, tiny_model, curated_dataset, candidate):
    items = items_for(curated_dataset)
    lines: list[str] = []
    result = run_evaluation(
        eval_settings,
        "eval-test-1",
        {"version": "2", "artifact_uri": candidate},
        str(tiny_model),
        {"version": "1", "artifact_uri": candidate, "base_model_name": str(tiny_model)},
        items,
        on_line=lines.append,
    )
    assert result["models"] == ["base", "candidate", "champion"]
    assert result["versions"] == {"candidate": "2", "champion": "1"}
    rows = storage.read_jsonl(result["predictions_uri"])
    assert len(rows) == 3 * len(items)
    assert {(r["model"], r["item_id"]) for r in rows} == {(m, i["item_id"]) for m in result["models"] for i in items}
    for row in rows:
        assert isinstance(row["response"], str)
        assert 0 <= row["response_tokens"] <= SETTINGS_UPDATE["max_new_tokens"]
        assert row["latency_s"] > 0 and row["tokens_per_s"] >= 0
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert 0 <= row["rouge_l"] <= 1 and 0 <= row["chrf"] <= 100 and 0 <= row["bleu"] <= 100
        assert -1 <= row["semantic_similarity"] <= 1 and -1 <= row["question_similarity"] <= 1
        assert row["refusal"] in (0.0, 1.0) and 0 <= row["repetition"] <= 1
        assert (row["exact_match"] is None) == (row["kind"] != "short_answer")
    by_model = {m: [r for r in rows if r["model"] == m] for m in result["models"]}
    # The same adapter as candidate and champion gives the same greedy answers and losses.
    assert [r["response"] for r in by_model["candidate"]] == [r["response"] for r in by_model["champion"]]
    assert [r["loss"] for r in by_model["candidate"]] == pytest.approx([r["loss"] for r in by_model["champion"]])
    # The adapter changed the model: its losses differ from the base model's.
    assert [r["loss"] for r in by_model["candidate"]] != pytest.approx([r["loss"] for r in by_model["base"]])
    assert set(result["summary"]["models"]) == {"base", "candidate", "champion"}
    assert any(line.startswith("evaluated candidate:") for line in lines)

    champion = {"version": "1", "artifact_uri": candidate, "base_model_name": str(tiny_model)}
    again = run_evaluation(
        eval_settings, "eval-test-1", {"version": "2", "artifact_uri": candidate}, str(tiny_model), champion, items
    )
    assert again["reused"] and again["predictions_uri"] == result["predictions_uri"]
    assert again["summary"]["inputs_sha256"] == result["summary"]["inputs_sha256"]

    # The same run evaluated again after its inputs changed (here: the champion is gone) runs anew.
    changed = run_evaluation(
        eval_settings, "eval-test-1", {"version": "2", "artifact_uri": candidate}, str(tiny_model), None, items
    )
    assert not changed["reused"] and changed["models"] == ["base", "candidate"]
    assert {r["model"] for r in storage.read_jsonl(changed["predictions_uri"])} == {"base", "candidate"}


def test_a_champion_without_its_artifact_is_an_error_not_a_skipped_comparison(eval_settings, tiny_model, candidate):
    from llmops.config import ConfigError

    with pytest.raises(ConfigError, match="champion \\(version 1\\) has no training.artifact_uri"):
        run_evaluation(
            eval_settings,
            "eval-test-4",
            {"version": "2", "artifact_uri": candidate},
            str(tiny_model),
            {"version": "1", "artifact_uri": None},
            [],
        )


def test_without_a_champion_only_base_and_candidate_run(eval_settings, tiny_model, curated_dataset, candidate):
    result = run_evaluation(
        eval_settings,
        "eval-test-2",
        {"version": "1", "artifact_uri": candidate},
        str(tiny_model),
        None,
        items_for(curated_dataset)[:3],
    )
    assert result["models"] == ["base", "candidate"]
    assert {r["model"] for r in storage.read_jsonl(result["predictions_uri"])} == {"base", "candidate"}


def test_a_broken_candidate_fails_the_job_with_its_reason_and_leaves_no_output(
    eval_settings, tiny_model, curated_dataset, tmp_path
):
    broken = tmp_path / "model.tar.gz"
    broken.write_bytes(b"not a tarball")
    with pytest.raises(TrainingJobError, match="evaluation job eval-test-3 failed"):
        run_evaluation(
            eval_settings,
            "eval-test-3",
            {"version": "1", "artifact_uri": broken.as_uri()},
            str(tiny_model),
            None,
            items_for(curated_dataset)[:2],
            on_line=lambda _: None,
        )
    jobs = storage.join(eval_settings.store_uri, "evaluation-jobs", "eval-test-3", "output")
    assert not storage.exists(storage.join(jobs, "summary.json"))
    assert not storage.exists(storage.join(jobs, "predictions.jsonl"))


def test_the_entrypoint_rejects_a_bad_config_with_the_field(tmp_path):
    config = tmp_path / "input" / "config" / "evaluation.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"models": [], "embedding_model": "x"}))
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate"],
        env={"LLMOPS_PROCESSING_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(PROJECT_ROOT),
    )
    assert result.returncode == 2
    assert "'models' must be a non-empty list" in result.stderr
