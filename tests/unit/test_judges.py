"""The LLM-as-judge: parsing a judge's reply, the offline heuristic judge, the Bedrock judge's
Converse request (validated by botocore's Stubber against the service model) and scoring rows."""

from __future__ import annotations

import json

import pytest

from llmops.judges import CRITERIA, BedrockJudge, JudgeError, Judgment, LocalJudge, judge_rows, parse_scores
from llmops.prompts import load_template

RUBRIC = load_template("judge_rubric")
GOOD = {"helpfulness": 7, "relevance": 9, "accuracy": 6, "detail": 5, "rationale": "mostly right"}

# --- parse_scores ----------------------------------------------------------------------------------


def test_parse_scores_reads_a_json_object_embedded_in_prose_and_fences():
    reply = f"Sure! Here is my assessment:\n```json\n{json.dumps(GOOD)}\n```\nThanks."
    judgment = parse_scores(reply)
    assert judgment.scores == {"helpfulness": 7.0, "relevance": 9.0, "accuracy": 6.0, "detail": 5.0}
    assert judgment.rationale == "mostly right"
    assert judgment.overall == pytest.approx(6.75)


def test_parse_scores_accepts_the_bounds_1_and_10():
    judgment = parse_scores(json.dumps({c: (1 if i % 2 else 10) for i, c in enumerate(CRITERIA)}))
    assert sorted(set(judgment.scores.values())) == [1.0, 10.0]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (json.dumps({k: v for k, v in GOOD.items() if k != "accuracy"}), r"score for 'accuracy' is None"),
        (json.dumps({**GOOD, "detail": 0}), r"score for 'detail' is 0, not a number from 1 to 10"),
        (json.dumps({**GOOD, "relevance": 11}), r"score for 'relevance' is 11, not a number from 1 to 10"),
        (json.dumps({**GOOD, "helpfulness": True}), r"score for 'helpfulness' is True"),
        (json.dumps({**GOOD, "accuracy": "8"}), r"score for 'accuracy' is '8'"),
        ("I would rate this answer eight out of ten.", r"holds no JSON object"),
        ('{"helpfulness": 7, "relevance": 9,}', r"is not valid JSON"),
    ],
    ids=["missing", "zero", "eleven", "boolean", "string", "no-json", "invalid-json"],
)
def test_parse_scores_rejects_unusable_replies_and_says_why(reply, message):
    with pytest.raises(JudgeError, match=message):
        parse_scores(reply)


def test_parse_scores_checks_the_criteria_it_is_given():
    assert parse_scores('{"clarity": 4}', ("clarity",)).scores == {"clarity": 4.0}
    with pytest.raises(JudgeError, match="'clarity'"):
        parse_scores(json.dumps(GOOD), ("clarity",))


def test_parse_scores_takes_the_first_object_even_when_later_prose_has_braces():
    reply = f"{json.dumps(GOOD)}\n\nNote: I treated the answer's {{key: value}} example as correct."
    assert parse_scores(reply).scores["accuracy"] == 6.0


# --- LocalJudge ------------------------------------------------------------------------------------

REFERENCE = (
    "zip iterates over several iterables in parallel and yields tuples, where the i-th tuple holds the i-th "
    "element of each iterable."
)


def row(**overrides) -> dict:
    base = {
        "prompt": "What does the zip built-in function do?",
        "reference": REFERENCE,
        "response": (
            "zip walks several iterables at the same time and produces tuples whose i-th entry comes from the "
            "i-th iterable."
        ),
        "semantic_similarity": 0.88,
        "question_similarity": 0.7,
        "chrf": 55.0,
        "repetition": 0.0,
        "refusal": 0.0,
        "exact_match": 0.0,
        "truncated": False,
    }
    return {**base, **overrides}


PARAPHRASE = row()
UNRELATED = row(
    response="The capital of France is Paris, a city known for its museums and its cafes along the river.",
    semantic_similarity=0.12,
    question_similarity=0.08,
    chrf=12.0,
)


def test_local_judge_says_it_is_not_an_llm():
    assert "not an LLM" in LocalJudge.label


@pytest.mark.parametrize(
    "answer",
    [row(refusal=1.0, response="I'm sorry, but I can't help with that."), row(response=""), row(response="  \n ")],
    ids=["refusal", "empty", "blank"],
)
def test_local_judge_scores_refusals_and_empty_answers_1_everywhere(answer):
    judgment = LocalJudge().judge(answer, RUBRIC)
    assert judgment.scores == {c: 1.0 for c in CRITERIA}
    assert judgment.overall == 1.0


def test_local_judge_ranks_a_close_paraphrase_above_an_unrelated_answer():
    judge = LocalJudge()
    good, bad = judge.judge(PARAPHRASE, RUBRIC), judge.judge(UNRELATED, RUBRIC)
    assert good.scores["accuracy"] > bad.scores["accuracy"]
    assert good.scores["relevance"] > bad.scores["relevance"]
    assert good.overall > bad.overall
    assert good.overall >= 7 and bad.overall <= 4


def test_local_judge_gives_a_correct_short_answer_full_accuracy():
    short = row(
        prompt="What is the value of 7 // 2 in Python? Answer with the value only.",
        reference="3",
        response="3",
        semantic_similarity=0.3,
        question_similarity=0.3,
        chrf=20.0,
        exact_match=1.0,
    )
    judgment = LocalJudge().judge(short, RUBRIC)
    assert judgment.scores["accuracy"] == 10.0
    assert LocalJudge().judge({**short, "exact_match": 0.0}, RUBRIC).scores["accuracy"] < 10.0


def test_local_judge_penalises_heavy_repetition_in_helpfulness_and_detail():
    judge = LocalJudge()
    clean = judge.judge(PARAPHRASE, RUBRIC)
    looping = judge.judge({**PARAPHRASE, "repetition": 0.8}, RUBRIC)
    assert looping.scores["helpfulness"] < clean.scores["helpfulness"] - 3
    assert looping.scores["detail"] < clean.scores["detail"] - 3


def test_local_judge_penalises_truncated_answers_in_helpfulness():
    judge = LocalJudge()
    assert (
        judge.judge({**PARAPHRASE, "truncated": True}, RUBRIC).scores["helpfulness"]
        < (judge.judge(PARAPHRASE, RUBRIC).scores["helpfulness"])
    )


@pytest.mark.parametrize(
    "signals",
    [
        {"semantic_similarity": 1.5, "question_similarity": 2.0, "chrf": 300.0, "repetition": 0.0},
        {"semantic_similarity": -0.4, "question_similarity": -1.0, "chrf": 0.0, "repetition": 1.0},
        {"semantic_similarity": None, "question_similarity": None, "chrf": None, "repetition": None},
        {"response": "word " * 500},
        {"response": "x", "reference": ""},
    ],
)
def test_local_judge_scores_stay_within_1_and_10(signals):
    judgment = LocalJudge().judge(row(**signals), RUBRIC)
    assert set(judgment.scores) == set(CRITERIA)
    assert all(1.0 <= s <= 10.0 for s in judgment.scores.values()), judgment.scores


# --- BedrockJudge through botocore's Stubber -------------------------------------------------------

MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"


@pytest.fixture
def bedrock(monkeypatch):
    import boto3
    from botocore.stub import Stubber

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("bedrock-runtime", region_name="us-east-1")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def converse_response(text: str) -> dict:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 250, "outputTokens": 40, "totalTokens": 290},
        "metrics": {"latencyMs": 812},
    }


def test_bedrock_request_carries_the_rubric_the_question_the_reference_and_the_answer():
    request = BedrockJudge(MODEL_ID, client=object()).request(PARAPHRASE, RUBRIC)
    assert request["modelId"] == MODEL_ID
    assert request["system"] == [{"text": RUBRIC.system}]
    assert "impartial judge" in request["system"][0]["text"]
    assert [t["role"] for t in request["messages"]] == ["user"]
    user = request["messages"][0]["content"][0]["text"]
    assert PARAPHRASE["prompt"] in user and PARAPHRASE["reference"] in user and PARAPHRASE["response"] in user
    assert request["inferenceConfig"]["temperature"] == 0


def test_bedrock_judge_sends_a_valid_converse_request_and_parses_the_scores(bedrock):
    client, stubber = bedrock
    judge = BedrockJudge(MODEL_ID, client=client)
    expected = {
        "modelId": MODEL_ID,
        "system": [{"text": RUBRIC.system}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "text": f"Question:\n{PARAPHRASE['prompt']}\n\nReference answer:\n{PARAPHRASE['reference']}"
                        f"\n\nCandidate answer:\n{PARAPHRASE['response']}"
                    }
                ],
            }
        ],
        "inferenceConfig": {"maxTokens": 400, "temperature": 0.0},
    }
    stubber.add_response("converse", converse_response(json.dumps(GOOD)), expected)
    judgment = judge.judge(PARAPHRASE, RUBRIC)
    assert isinstance(judgment, Judgment)
    assert judgment.scores == {"helpfulness": 7.0, "relevance": 9.0, "accuracy": 6.0, "detail": 5.0}
    assert judgment.rationale == "mostly right"
    assert judge.label == f"Amazon Bedrock model {MODEL_ID}"


def test_bedrock_judge_raises_judge_error_on_an_unparseable_reply(bedrock):
    client, stubber = bedrock
    stubber.add_response("converse", converse_response("I think this answer is quite good overall."))
    with pytest.raises(JudgeError, match="no JSON object"):
        BedrockJudge(MODEL_ID, client=client).judge(PARAPHRASE, RUBRIC)


# --- judge_rows ------------------------------------------------------------------------------------


class ScriptedJudge:
    """Scores every answer 2, 4, 6, 8 (overall 5), failing on the item ids it is told to."""

    label = "scripted test judge"

    def __init__(self, failing: set[str] = frozenset()):
        self.failing = failing

    def judge(self, row: dict, rubric) -> Judgment:
        if row["item_id"] in self.failing:
            raise JudgeError("unparseable reply")
        return Judgment({"helpfulness": 2.0, "relevance": 4.0, "accuracy": 6.0, "detail": 8.0}, "scripted")


def rows(n: int) -> list[dict]:
    return [{**PARAPHRASE, "item_id": f"test:{i}", "model": "candidate" if i % 2 else "base"} for i in range(n)]


def test_judge_rows_returns_one_scored_row_per_answer_keyed_by_item_and_model():
    inputs = rows(6)
    judged = judge_rows(inputs, ScriptedJudge(), RUBRIC, max_workers=3)
    assert [(j["item_id"], j["model"]) for j in judged] == [(r["item_id"], r["model"]) for r in inputs]
    for j in judged:
        assert {k: j[k] for k in ("judge_helpfulness", "judge_relevance", "judge_accuracy", "judge_detail")} == {
            "judge_helpfulness": 2.0,
            "judge_relevance": 4.0,
            "judge_accuracy": 6.0,
            "judge_detail": 8.0,
        }
        assert j["judge_overall"] == 5.0
        assert j["judge_rationale"] == "scripted"


def test_judge_rows_overall_is_the_mean_of_the_local_judges_scores():
    judged = judge_rows(rows(2), LocalJudge(), RUBRIC)
    for j in judged:
        assert j["judge_overall"] == pytest.approx(sum(j[f"judge_{c}"] for c in CRITERIA) / 4, abs=1e-3)


def test_judge_rows_leaves_a_few_unscorable_answers_unscored_and_reports_them():
    errors: list[str] = []
    judged = judge_rows(rows(20), ScriptedJudge({"test:7", "test:12"}), RUBRIC, on_error=errors.append)
    assert len(judged) == 20
    unscored = [j for j in judged if j["judge_overall"] is None]
    assert [j["item_id"] for j in unscored] == ["test:7", "test:12"]
    assert all("judge_accuracy" not in j and j["judge_rationale"].startswith("unscored") for j in unscored)
    assert sorted(errors) == sorted(["candidate / test:7: unparseable reply", "base / test:12: unparseable reply"])
    assert sum(j["judge_overall"] == 5.0 for j in judged) == 18


def test_judge_rows_fails_when_more_than_a_tenth_cannot_be_scored():
    errors: list[str] = []
    with pytest.raises(JudgeError, match=r"scripted test judge could not score 3 of 20 answers"):
        judge_rows(rows(20), ScriptedJudge({"test:1", "test:2", "test:3"}), RUBRIC, on_error=errors.append)
    assert len(errors) == 3


def test_judge_rows_of_nothing_is_nothing():
    assert judge_rows([], ScriptedJudge(), RUBRIC) == []
