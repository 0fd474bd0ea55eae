"""The evaluation steps that need no model: the items asked of every model, the approval's
status, judging an evaluation's predictions (and reusing earlier judgments) and merging them."""

from __future__ import annotations

import json
import random

import pytest

from llmops import storage
from llmops.costs import estimate_cost
from llmops.evaluation import approval_status, build_items, judge_evaluation, merged_rows
from llmops.judges import CRITERIA, Judgment, LocalJudge
from llmops.prompts import load_eval_catalog, load_template
from tests.datagen import dataset_manifest

CATALOG = load_eval_catalog()
TEMPLATE = load_template(CATALOG.template)
RUBRIC = load_template("judge_rubric")

# --- build_items -----------------------------------------------------------------------------------


def records(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "id": f"rec-{i:03d}",
            "prompt": f"What does function number {i} do?",
            "response": f"Function number {i} returns {i}.",
            "system": "You are a concise assistant.",
        }
        for i in range(start, start + n)
    ]


def dataset_with(tmp_path, test: list[dict], name: str = "test.jsonl") -> dict:
    """A dataset manifest whose test split is ``test`` (in the file ``name``)."""
    files = {}
    splits = (("train", [], "train.jsonl"), ("validation", [], "validation.jsonl"), ("test", test, name))
    for split, split_records, file_name in splits:
        payload = "".join(json.dumps(r) + "\n" for r in split_records).encode()
        (tmp_path / file_name).write_bytes(payload)
        files[split] = (f"file://{tmp_path / file_name}", payload)
    return dataset_manifest(files)


def sampled(items: list[dict]) -> list[dict]:
    return [i for i in items if i["set"] == "test"]


def ids(items: list[dict]) -> list[str]:
    return [i["item_id"] for i in items]


@pytest.mark.parametrize(("n_test", "max_items", "expected"), [(30, 8, 8), (5, 8, 5), (8, 8, 8), (12, 0, 0)])
def test_build_items_samples_at_most_max_test_items(tmp_path, n_test, max_items, expected):
    items = build_items(dataset_with(tmp_path, records(n_test)), TEMPLATE, CATALOG, max_items)
    assert len(sampled(items)) == expected
    assert len(items) == expected + len(CATALOG.items)


def test_build_items_sample_does_not_depend_on_the_order_of_the_test_file(tmp_path):
    test = records(40)
    shuffled = test[:]
    random.Random(7).shuffle(shuffled)
    first = build_items(dataset_with(tmp_path, test, "a.jsonl"), TEMPLATE, CATALOG, 10)
    second = build_items(dataset_with(tmp_path, shuffled, "b.jsonl"), TEMPLATE, CATALOG, 10)
    assert first == second
    assert build_items(dataset_with(tmp_path, test, "a.jsonl"), TEMPLATE, CATALOG, 10) == first


def test_build_items_sample_is_not_simply_the_first_lines(tmp_path):
    # A fixed sample by record id, not "the head of the file": otherwise line order would decide it.
    items = build_items(dataset_with(tmp_path, records(40)), TEMPLATE, CATALOG, 10)
    assert ids(sampled(items)) != [f"test:rec-{i:03d}" for i in range(10)]


def test_build_items_adding_records_never_brings_back_one_that_was_left_out(tmp_path):
    original = records(30)
    before = set(ids(sampled(build_items(dataset_with(tmp_path, original, "a.jsonl"), TEMPLATE, CATALOG, 10))))
    grown = original + records(30, start=30)
    after = set(ids(sampled(build_items(dataset_with(tmp_path, grown, "b.jsonl"), TEMPLATE, CATALOG, 10))))
    assert len(after) == 10
    original_ids = {f"test:{r['id']}" for r in original}
    assert after & original_ids <= before


def test_build_items_test_items_carry_the_record(tmp_path):
    test = records(3)
    items = sampled(build_items(dataset_with(tmp_path, test, "a.jsonl"), TEMPLATE, CATALOG, 10))
    by_id = {i["item_id"]: i for i in items}
    for r in test:
        item = by_id[f"test:{r['id']}"]
        assert item["kind"] == "open"
        assert (item["prompt"], item["reference"], item["system"]) == (r["prompt"], r["response"], r["system"])


def test_build_items_renders_every_catalog_item_with_the_template(tmp_path):
    items = build_items(dataset_with(tmp_path, records(4)), TEMPLATE, CATALOG, 4)
    catalog_items = {i["item_id"]: i for i in items if i["set"] == "catalog"}
    assert list(catalog_items) == [f"catalog:{c.id}" for c in CATALOG.items]
    with_context = [c for c in CATALOG.items if c.context]
    assert with_context and len(with_context) < len(CATALOG.items)
    for c in CATALOG.items:
        item = catalog_items[f"catalog:{c.id}"]
        assert item["system"] == TEMPLATE.system
        expected_prompt = f"{c.instruction}\n\n{c.context}" if c.context else c.instruction
        assert item["prompt"] == expected_prompt
        assert item["reference"] == c.reference
        assert item["kind"] == c.kind
    assert {i["kind"] for i in catalog_items.values()} == {"short_answer", "open"}


def test_build_items_ids_are_prefixed_and_unique(tmp_path):
    # A test record whose id matches a catalog id still gets its own item id.
    test = [*records(5), {**records(1)[0], "id": CATALOG.items[0].id}]
    items = build_items(dataset_with(tmp_path, test), TEMPLATE, CATALOG, 10)
    assert len(ids(items)) == len(set(ids(items))) == 6 + len(CATALOG.items)
    assert all(i.startswith("test:") for i in ids(sampled(items)))
    assert all(i["item_id"].startswith("catalog:") for i in items if i["set"] == "catalog")


# --- approval_status -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("approval", "expected"),
    [
        (None, {"status": "not_required", "by": ""}),
        (
            {"chosen_options": ["Approve"], "responded_by_user": {"id": "7", "name": "alice"}},
            {"status": "approved", "by": "alice"},
        ),
        (
            {"chosen_options": ["Reject"], "responded_by_user": {"id": "8", "name": "bob"}},
            {"status": "rejected", "by": "bob"},
        ),
        ({"chosen_options": ["Reject"], "responded_by_user": None}, {"status": "rejected_on_timeout", "by": ""}),
    ],
    ids=["not-asked", "approved", "rejected", "timeout"],
)
def test_approval_status(approval, expected):
    assert approval_status(approval) == expected


# --- judge_evaluation and merged_rows --------------------------------------------------------------


def prediction(item_id: str, model: str, **signals) -> dict:
    return {
        "item_id": item_id,
        "model": model,
        "set": "catalog",
        "prompt": "What does the zip built-in function do?",
        "reference": "zip iterates over several iterables in parallel and yields tuples.",
        "response": "zip walks several iterables at once, yielding tuples.",
        "semantic_similarity": 0.85,
        "question_similarity": 0.6,
        "chrf": 50.0,
        "repetition": 0.0,
        "refusal": 0.0,
        "exact_match": 0.0,
        "truncated": False,
        "latency_s": 0.4,
        **signals,
    }


PREDICTIONS = [
    prediction("catalog:zip-builtin", "base"),
    prediction("catalog:zip-builtin", "candidate", response="I can't help with that.", refusal=1.0),
    prediction("test:rec-001", "base", semantic_similarity=0.1, question_similarity=0.05, chrf=5.0),
    prediction("test:rec-001", "candidate"),
]


@pytest.fixture
def evaluation(tmp_path) -> dict:
    folder = storage.to_uri(str(tmp_path / "store" / "evaluation-jobs" / "job-1" / "output"))
    predictions_uri = storage.join(folder, "predictions.jsonl")
    storage.write_jsonl(predictions_uri, PREDICTIONS)
    # What run_evaluation returns; this summary has no inputs_sha256, as a SageMaker job's has none.
    return {
        "job_name": "job-1",
        "backend": "local",
        "predictions_uri": predictions_uri,
        "summary": {"models": {"base": {}, "candidate": {}}},
        "log_uri": storage.join(folder, "evaluation.log"),
        "reused": False,
        "items_uri": storage.join(folder.rsplit("/", 1)[0], "input", "items.jsonl"),
        "models": ["base", "candidate"],
        "versions": {"candidate": "1"},
        "cost": estimate_cost("local", 1, 12.5, {}),
    }


class CountingJudge:
    def __init__(self, label: str = "counting test judge"):
        self.label = label
        self.calls = 0

    def judge(self, row: dict, rubric) -> Judgment:
        self.calls += 1
        return Judgment(dict.fromkeys(CRITERIA, 6.0), "counted")


def test_judge_evaluation_writes_judgments_next_to_the_predictions(evaluation):
    result = judge_evaluation(evaluation, LocalJudge(), RUBRIC, on_error=pytest.fail)
    folder = evaluation["predictions_uri"].rsplit("/", 1)[0]
    assert result["judgments_uri"] == f"{folder}/judgments.jsonl"
    assert result["reused"] is False
    assert result["judge"] == LocalJudge.label and result["rubric"] == RUBRIC.ref and result["unscored"] == 0
    judged = storage.read_jsonl(result["judgments_uri"])
    assert [(j["item_id"], j["model"]) for j in judged] == [(p["item_id"], p["model"]) for p in PREDICTIONS]
    assert all(1 <= j["judge_overall"] <= 10 for j in judged)
    assert judged[1]["judge_overall"] == 1.0  # the refusal
    assert judged[0]["judge_overall"] > judged[2]["judge_overall"]  # on-topic beats unrelated
    meta = storage.read_json(f"{folder}/judgments.json")
    assert meta == {"judge": LocalJudge.label, "rubric": RUBRIC.ref, "predictions": None, "unscored": 0}


def test_judge_evaluation_reuses_earlier_judgments_by_the_same_judge(evaluation):
    judge = CountingJudge()
    first = judge_evaluation(evaluation, judge, RUBRIC)
    assert judge.calls == len(PREDICTIONS) and first["reused"] is False
    written = storage.read_bytes(first["judgments_uri"])

    again = judge_evaluation(evaluation, judge, RUBRIC)
    assert judge.calls == len(PREDICTIONS)
    assert again["reused"] is True
    assert again["judgments_uri"] == first["judgments_uri"] and again["judge"] == judge.label
    assert storage.read_bytes(first["judgments_uri"]) == written


def test_judge_evaluation_does_not_reuse_another_judges_scores(evaluation):
    judge_evaluation(evaluation, CountingJudge("first judge"), RUBRIC)
    other = CountingJudge("second judge")
    result = judge_evaluation(evaluation, other, RUBRIC)
    assert result["reused"] is False and other.calls == len(PREDICTIONS)
    folder = evaluation["predictions_uri"].rsplit("/", 1)[0]
    assert storage.read_json(f"{folder}/judgments.json")["judge"] == "second judge"


def test_judge_evaluation_does_not_reuse_scores_made_with_another_rubric_version(evaluation):
    judge = CountingJudge()
    judge_evaluation(evaluation, judge, RUBRIC)
    result = judge_evaluation(evaluation, judge, RUBRIC.with_version(3))
    assert result["reused"] is False and judge.calls == 2 * len(PREDICTIONS)
    assert result["rubric"] == "judge_rubric@3"


def test_merged_rows_adds_the_judges_fields_to_each_prediction(evaluation):
    judged = judge_evaluation(evaluation, LocalJudge(), RUBRIC)
    judgments = {(j["item_id"], j["model"]): j for j in storage.read_jsonl(judged["judgments_uri"])}
    rows = merged_rows(evaluation["predictions_uri"], judged["judgments_uri"])
    assert len(rows) == len(PREDICTIONS)
    for merged, original in zip(rows, PREDICTIONS, strict=True):
        assert {k: merged[k] for k in original} == original
        expected = judgments[(original["item_id"], original["model"])]
        assert {k: merged[k] for k in expected} == expected
        assert set(merged) >= {f"judge_{c}" for c in CRITERIA} | {"judge_overall", "judge_rationale"}


def test_merged_rows_matches_by_item_and_model_not_by_position(tmp_path, evaluation):
    judgments_uri = storage.to_uri(str(tmp_path / "judgments.jsonl"))
    storage.write_jsonl(
        judgments_uri,
        [
            {"item_id": "test:rec-001", "model": "candidate", "judge_overall": 9.0},
            {"item_id": "catalog:zip-builtin", "model": "base", "judge_overall": 4.0},
        ],
    )
    rows = merged_rows(evaluation["predictions_uri"], judgments_uri)
    overall = {(r["item_id"], r["model"]): r.get("judge_overall") for r in rows}
    assert overall == {
        ("catalog:zip-builtin", "base"): 4.0,
        ("catalog:zip-builtin", "candidate"): None,
        ("test:rec-001", "base"): None,
        ("test:rec-001", "candidate"): 9.0,
    }
    assert "judge_overall" not in rows[1]


def test_merged_rows_without_judgments_is_the_predictions(evaluation):
    assert merged_rows(evaluation["predictions_uri"], None) == storage.read_jsonl(evaluation["predictions_uri"])
