"""LLM-as-judge: score each answer 1-10 on the rubric of the prompt catalog (``judge_rubric``).

Two judges behind one interface (``judge(row, rubric) -> Judgment``):

* ``BedrockJudge`` sends the rubric's messages to an Amazon Bedrock model through the Amazon
  provider's ``BedrockRuntimeHook`` (Converse API) and parses the JSON scores it answers with.
* ``LocalJudge`` is the offline twin. It is **not** a language model: it derives the same four
  scores from signals the evaluation job measured (similarity to the reference and to the
  question, character F-score, length against the reference, repetition, refusal). Its label says
  so, and every report and approval form shows the label.

``judge_rows`` scores every evaluated answer and returns rows of ``judge_*`` fields keyed by
(item, model), ready to merge into the evaluation's predictions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from llmops.config import Settings
from llmops.prompts import PromptTemplate

CRITERIA = ("helpfulness", "relevance", "accuracy", "detail")
MAX_UNSCORED_FRACTION = 0.1


class JudgeError(RuntimeError):
    """The judge could not score an answer (unparseable reply, or too many failures)."""


@dataclass(frozen=True)
class Judgment:
    scores: dict[str, float]
    rationale: str = ""

    @property
    def overall(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


class Judge(Protocol):
    label: str

    def judge(self, row: dict, rubric: PromptTemplate) -> Judgment: ...


def criteria_of(rubric: PromptTemplate) -> tuple[str, ...]:
    listed = tuple(c.strip() for c in rubric.tags.get("criteria", "").split(",") if c.strip())
    return listed or CRITERIA


def parse_scores(text: str, criteria: tuple[str, ...] = CRITERIA) -> Judgment:
    """The first JSON object in a judge's reply, with a number from 1 to 10 for every criterion."""
    start = text.find("{")
    if start < 0:
        raise JudgeError(f"the judge's reply holds no JSON object: {text[:200]!r}")
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as exc:
        raise JudgeError(f"the judge's reply is not valid JSON ({exc.msg}): {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise JudgeError(f"the judge's reply is not a JSON object: {text[:200]!r}")
    scores = {}
    for criterion in criteria:
        value = data.get(criterion)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 10:
            raise JudgeError(f"the judge's score for {criterion!r} is {value!r}, not a number from 1 to 10")
        scores[criterion] = float(value)
    return Judgment(scores, str(data.get("rationale", ""))[:500])


def _clamp(x: float) -> float:
    return max(0.0, min(1.0, x))


def _scale(x: float) -> float:
    """[0, 1] onto the rubric's 1-10."""
    return round(1 + 9 * _clamp(x), 1)


class LocalJudge:
    """The offline judge: rubric scores from measured signals, no language model involved."""

    label = "local heuristic judge (not an LLM: scores derived from similarity, overlap, length and refusal)"

    def judge(self, row: dict, rubric: PromptTemplate) -> Judgment:
        criteria = criteria_of(rubric)
        response = (row.get("response") or "").strip()
        if not response or row.get("refusal"):
            why = "empty answer" if not response else "the answer is a refusal"
            return Judgment({c: 1.0 for c in criteria}, why)
        similarity = float(row.get("semantic_similarity") or 0.0)
        on_topic = float(row.get("question_similarity") or 0.0)
        chrf = float(row.get("chrf") or 0.0) / 100
        repetition = float(row.get("repetition") or 0.0)
        relevance = _clamp((on_topic - 0.1) / 0.6)
        has_reference = bool((row.get("reference") or "").strip())
        # MiniLM similarity of unrelated English sentences sits around 0.1-0.2; a paraphrase of the
        # reference is around 0.8 and up. A correct short answer is fully accurate whatever its length.
        # Without a reference (live traffic), accuracy cannot be measured: relevance stands in for it.
        if not has_reference:
            accuracy = relevance
        elif row.get("exact_match") == 1.0:
            accuracy = 1.0
        else:
            accuracy = _clamp((0.75 * similarity + 0.25 * chrf - 0.15) / 0.65)
        words = max(1, len(response.split()))
        reference_words = max(1, len(row["reference"].split())) if has_reference else 40  # a typical answer
        ratio = words / reference_words
        # Too short says too little; far too long pads. Repetition is never detail.
        detail = _clamp(min(ratio, 2.0 / ratio) if ratio > 1 else ratio) * (1 - repetition)
        helpfulness = (0.6 * accuracy + 0.4 * relevance) * (1 - repetition) * (0.8 if row.get("truncated") else 1.0)
        signals = {"helpfulness": helpfulness, "relevance": relevance, "accuracy": accuracy, "detail": detail}
        scores = {c: _scale(signals.get(c, (accuracy + relevance) / 2)) for c in criteria}
        if not has_reference:
            return Judgment(
                scores,
                f"no reference (accuracy from relevance): similarity to question {on_topic:.2f}, "
                f"{words} words, repetition {repetition:.2f}",
            )
        return Judgment(
            scores,
            f"similarity to reference {similarity:.2f}, to question {on_topic:.2f}, chrF {chrf * 100:.0f}, "
            f"length {ratio:.1f}x reference, repetition {repetition:.2f}",
        )


class BedrockJudge:
    """An Amazon Bedrock model as the judge, through the Amazon provider's runtime hook."""

    def __init__(
        self,
        model_id: str,
        aws_conn_id: str = "aws_default",
        region: str | None = None,
        max_tokens: int = 400,
        client=None,
    ):
        self.model_id = model_id
        self.aws_conn_id = aws_conn_id
        self.region = region
        self.max_tokens = max_tokens
        self._client = client
        self.label = f"Amazon Bedrock model {model_id}"

    @property
    def client(self):
        if self._client is None:
            from airflow.providers.amazon.aws.hooks.bedrock import BedrockRuntimeHook

            self._client = BedrockRuntimeHook(aws_conn_id=self.aws_conn_id, region_name=self.region).conn
        return self._client

    def request(self, row: dict, rubric: PromptTemplate) -> dict:
        """The Converse request for one answer: the rubric's system message and its user turn."""
        messages = rubric.render(question=row["prompt"], reference=row.get("reference", ""), answer=row["response"])
        system = [{"text": m["content"]} for m in messages if m["role"] == "system"]
        turns = [{"role": m["role"], "content": [{"text": m["content"]}]} for m in messages if m["role"] != "system"]
        request = {
            "modelId": self.model_id,
            "messages": turns,
            "inferenceConfig": {"maxTokens": self.max_tokens, "temperature": 0.0},
        }
        if system:
            request["system"] = system
        return request

    def judge(self, row: dict, rubric: PromptTemplate) -> Judgment:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # botocore already retried throttling; what is left fails this answer, not the run.
            response = self.client.converse(**self.request(row, rubric))
        except (BotoCoreError, ClientError) as exc:
            raise JudgeError(f"{self.label} failed: {exc}") from None
        blocks = response.get("output", {}).get("message", {}).get("content", [])
        text = "".join(block.get("text", "") for block in blocks)
        return parse_scores(text, criteria_of(rubric))


def judge_rows(
    rows: list[dict],
    judge: Judge,
    rubric: PromptTemplate,
    max_workers: int = 4,
    on_error: Callable[[str], None] = print,
) -> list[dict]:
    """One row of ``judge_*`` scores per evaluated answer. An answer the judge cannot score gets no
    scores (and is reported); more than ``MAX_UNSCORED_FRACTION`` of them fails the whole run."""

    def score(row: dict) -> dict:
        key = {"item_id": row["item_id"], "model": row["model"]}
        try:
            judgment = judge.judge(row, rubric)
        except JudgeError as exc:
            on_error(f"{row['model']} / {row['item_id']}: {exc}")
            return {**key, "judge_overall": None, "judge_rationale": f"unscored: {exc}"}
        return {
            **key,
            **{f"judge_{c}": v for c, v in judgment.scores.items()},
            "judge_overall": round(judgment.overall, 3),
            "judge_rationale": judgment.rationale,
        }

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        judged = list(pool.map(score, rows))
    unscored = sum(j["judge_overall"] is None for j in judged)
    if rows and unscored / len(rows) > MAX_UNSCORED_FRACTION:
        raise JudgeError(
            f"{judge.label} could not score {unscored} of {len(rows)} answers (more than "
            f"{MAX_UNSCORED_FRACTION:.0%}); see the errors above"
        )
    return judged


def make_judge(settings: Settings):
    if settings.evaluation.judge == "bedrock":
        return BedrockJudge(settings.evaluation.judge_model_id, settings.aws.conn_id, settings.aws.region)
    return LocalJudge()


# -- pairwise: the online judge of a rollout ----------------------------------------------------------


@dataclass(frozen=True)
class Preference:
    """Which of two answers to the same prompt the judge prefers: ``first``, ``second`` or ``tie``."""

    winner: str
    first: float
    second: float
    rationale: str = ""


def echo_share(prompt: str, response: str) -> float:
    """Share of the answer's words that are the prompt's: 1.0 for an answer that repeats the prompt."""
    words = [w.strip(".,;:!?()[]{}\"'`").lower() for w in response.split()]
    words = [w for w in words if w]
    if not words:
        return 0.0
    asked = {w.strip(".,;:!?()[]{}\"'`").lower() for w in prompt.split()}
    return sum(w in asked for w in words) / len(words)


class PairwiseJudge:
    """Compares two answers to one prompt with a single-answer judge, shown in the order given.

    Without a reference (live traffic) the local judge's accuracy is similarity to the question,
    which an answer that echoes the question maximises; here each answer's score is cut by how much
    of it is the prompt's own words beyond ``echo_free`` (an answer naturally reuses some), down to
    the rubric's minimum for a pure echo. Scores closer than ``tie_margin`` are a tie. The offline
    evaluation keeps scoring answers one at a time (``judge_rows``)."""

    def __init__(self, judge: Judge, tie_margin: float = 0.25, echo_free: float = 0.6):
        if not 0 <= echo_free < 1:
            raise ValueError(f"echo_free must lie in [0, 1), got {echo_free}")
        self.judge = judge
        self.tie_margin = tie_margin
        self.echo_free = echo_free
        self.label = f"pairwise, by {judge.label}"

    def score(self, row: dict, rubric: PromptTemplate) -> tuple[float, str]:
        overall = self.judge.judge(row, rubric).overall
        echo = echo_share(row.get("prompt", ""), row.get("response", ""))
        cut = max(0.0, (echo - self.echo_free) / (1 - self.echo_free))
        if cut > 0:
            return 1 + (overall - 1) * (1 - cut), f"{echo:.0%} of its words are the prompt's"
        return overall, ""

    def compare(self, first: dict, second: dict, rubric: PromptTemplate) -> Preference:
        (a, why_a), (b, why_b) = self.score(first, rubric), self.score(second, rubric)
        winner = "tie" if abs(a - b) < self.tie_margin else "first" if a > b else "second"
        notes = "; ".join(f"{side}: {why}" for side, why in (("first", why_a), ("second", why_b)) if why)
        return Preference(winner, round(a, 3), round(b, 3), notes)
