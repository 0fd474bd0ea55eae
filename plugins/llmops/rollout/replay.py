"""Traffic a rollout phase replays through the endpoint, and how its captured answers are scored.

Replayed prompts are recent captured ones, topped up from the evaluation catalog; requests go
through the SageMaker runtime API (``invoke_endpoint``), so the same code calls the local gateway
and a SageMaker endpoint. The captured request/response pairs are scored by the online judge
(and, where the catalog has one, against a reference answer).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from llmops.capture import request_prompt
from llmops.config import Settings
from llmops.encoder import make_sentence_encoder
from llmops.judges import JudgeError, PairwiseJudge, make_judge
from llmops.prompts import load_eval_catalog, load_registered
from serving.capture import read_capture
from training.metrics import chrf, exact_match, is_refusal, repetition_rate


def catalog_items(settings: Settings) -> list[dict]:
    """The evaluation catalog's items as chat requests (system and user turn, with references)."""

    catalog = load_eval_catalog()
    template = load_registered(settings.mlflow.tracking_uri, catalog.template)
    items = []
    for item in catalog.items:
        system, prompt = template.render_instruction(item.instruction, item.context)
        items.append(
            {
                "id": f"catalog:{item.id}",
                "system": system,
                "prompt": prompt,
                "reference": item.reference,
                "kind": item.kind,
            }
        )
    return items


def replay_items(settings: Settings, count: int, lookback_hours: float, now: datetime | None = None) -> list[dict]:
    """Up to ``count`` distinct prompts to replay (``replay`` cycles through them): prompts captured
    on the endpoint's production variants in the last ``lookback_hours`` (newest first), topped up
    from the evaluation catalog."""

    now = now or datetime.now(UTC)
    start = datetime.fromtimestamp(now.timestamp() - lookback_hours * 3600, UTC)
    scan = read_capture(settings.serving.capture_uri, settings.serving.endpoint_name, start=start, end=now)
    items, seen = [], set()
    for record in reversed(scan.records):
        if record.shadow or not (record.status_code is None or 200 <= record.status_code < 300):
            continue
        system, prompt = request_prompt(record.request_json())
        if prompt and prompt not in seen:
            seen.add(prompt)
            items.append(
                {
                    "id": f"captured:{record.event_id}",
                    "system": system,
                    "prompt": prompt,
                    "reference": "",
                    "kind": "open",
                }
            )
        if len(items) >= count:
            return items
    catalog = [i for i in catalog_items(settings) if i["prompt"] not in seen]
    return items + catalog[: count - len(items)]


def invocation_body(item: dict, max_new_tokens: int) -> bytes:
    messages = ([{"role": "system", "content": item["system"]}] if item.get("system") else []) + [
        {"role": "user", "content": item["prompt"]}
    ]
    return json.dumps(
        {"inputs": messages, "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0.0}}
    ).encode()


def replay(
    settings: Settings,
    backend,
    items: list[dict],
    minimum: int,
    maximum: int | None = None,
    until: Callable[[list[dict]], bool] | None = None,
    tag: str = "replay",
) -> list[dict]:
    """Send ``items`` (cycled) through the endpoint with ``invoke_endpoint``, routed by weight: at
    least ``minimum`` requests, then on until ``until(results)`` holds or ``maximum`` is reached.
    Returns one result per request: item, invoked variant, status (and, when answered, the latency
    the caller saw)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if not items or minimum <= 0:
        return []
    runtime = backend.runtime()
    endpoint = settings.serving.endpoint_name
    maximum = max(minimum, maximum or minimum)

    def send(index: int) -> dict:
        item = items[index % len(items)]
        began = time.perf_counter()
        try:
            response = runtime.invoke_endpoint(
                EndpointName=endpoint,
                Body=invocation_body(item, settings.serving.replay_max_new_tokens),
                ContentType="application/json",
                Accept="application/json",
                InferenceId=f"{tag}-{index}"[:64],
            )
            response["Body"].read()
            return {
                "item": item["id"],
                "variant": response.get("InvokedProductionVariant"),
                "status": 200,
                # The caller's view: the model's latency plus the network, so never less than it.
                "latency_ms": (time.perf_counter() - began) * 1000,
            }
        except ClientError as exc:
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            return {
                "item": item["id"],
                "variant": headers.get("x-amzn-invoked-production-variant"),
                "status": exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500),
                "error": str(exc)[:300],
            }
        except BotoCoreError as exc:
            return {"item": item["id"], "variant": None, "status": 503, "error": str(exc)[:300]}

    results: list[dict] = []
    batch = settings.serving.replay_concurrency
    with ThreadPoolExecutor(max_workers=batch) as pool:
        while len(results) < maximum:
            if len(results) >= minimum and (until is None or until(results)):
                break
            size = min(batch, maximum - len(results))
            results += list(pool.map(send, range(len(results), len(results) + size)))
    return results


def wait_for_shadow(backend, endpoint: str, shadow_variant: str, expected: int, since: float, timeout: float) -> int:
    """Wait until the shadow answered ``expected`` mirrored requests since ``since`` (its copies are
    sent after the callers have their answers); returns how many it answered."""
    deadline = time.monotonic() + timeout
    while True:
        window = backend.variant_windows(endpoint, since, shadow=True).get(shadow_variant)
        answered = window.invocations if window else 0
        if answered >= expected or time.monotonic() > deadline:
            return answered
        time.sleep(backend.metrics_poll_seconds)


def wait_for_capture(event_count: Callable[[], int], expected: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while event_count() < expected and time.monotonic() < deadline:
        time.sleep(0.25)


def captured_rows(records, references: dict[str, dict]) -> list[dict]:
    """Judge-ready rows of captured answers: the prompt, the answer, the reference when the prompt
    is one of ``references`` (replayed catalog items), and the signals the local judge reads."""
    rows = []
    for record in records:
        _, prompt = request_prompt(record.request_json())
        answered = record.status_code is None or 200 <= record.status_code < 300
        answer = record.response_json() if answered else None
        response = answer.get("generated_text", "") if isinstance(answer, dict) else ""
        item = references.get(prompt, {})
        rows.append(
            {
                "item_id": record.event_id,
                "model": record.variant,
                "prompt": prompt,
                "response": response,
                "reference": item.get("reference", ""),
                "kind": item.get("kind", "open"),
                "truncated": isinstance(answer, dict) and answer.get("finish_reason") == "length",
                "failed": answer is None,
            }
        )
    return rows


def judge_signals(settings: Settings, rows: list[dict]) -> list[dict]:
    """Each row with the signals the local judge reads: similarity to the question (and to the
    reference, with chrF and exact match, where the row has one), repetition, refusal."""

    if not rows:
        return []
    embedder = make_sentence_encoder(settings)  # NumPy where the worker has no torch (MWAA)
    responses = [r["response"] for r in rows]
    with_reference = [i for i, r in enumerate(rows) if r["reference"]]
    to_reference = embedder.similarity(
        [responses[i] for i in with_reference], [rows[i]["reference"] for i in with_reference]
    )
    to_question = embedder.similarity(responses, [r["prompt"] for r in rows])
    similarity = dict(zip(with_reference, to_reference, strict=True))
    signalled = []
    for index, row in enumerate(rows):
        signals = {
            **row,
            "question_similarity": to_question[index],
            "repetition": repetition_rate(row["response"]),
            "refusal": 1.0 if is_refusal(row["response"]) else 0.0,
        }
        if row["reference"]:
            signals["semantic_similarity"] = similarity[index]
            signals["chrf"] = chrf(row["response"], row["reference"])
            if row["kind"] == "short_answer":
                signals["exact_match"] = exact_match(row["response"], row["reference"])
        signalled.append(signals)
    return signalled


def score_rows(settings: Settings, rows: list[dict]) -> list[float | None]:
    """The judge's overall score (1-10) of each row; an answer that failed scores None."""

    if not rows:
        return []
    judge = make_judge(settings)
    rubric = load_registered(settings.mlflow.tracking_uri, "judge_rubric")
    scores: list[float | None] = []
    for signals in judge_signals(settings, rows):
        if signals["failed"]:
            scores.append(None)
            continue
        try:
            scores.append(judge.judge(signals, rubric).overall)
        except JudgeError:
            scores.append(None)
    return scores


def pairwise_preferences(settings: Settings, pairs: list[tuple[dict, dict]], seed: str, swap_every: int = 4) -> dict:
    """The pairwise judge on (challenger row, champion row) pairs of answers to the same prompt.

    Each pair is shown in a random order (seeded by ``seed``, so a re-run judges alike); every
    ``swap_every``-th pair is judged in both orders, which measures position bias (how often the
    first position wins once the pair is swapped: 0.5 is none, among decided pairs) and averages it
    out of that pair. Returns the challenger's preference per pair (1 wins, 0.5 tie, 0 loses; None
    when either answer failed or the judge could not), and the bias figures."""
    if swap_every < 1:
        raise ValueError(f"swap_every must be at least 1, got {swap_every}")
    rng = random.Random(seed)
    judge = PairwiseJudge(make_judge(settings))
    rubric = load_registered(settings.mlflow.tracking_uri, "judge_rubric")
    signalled = judge_signals(settings, [row for pair in pairs for row in pair])
    preferences: list[float | None] = []
    first_wins = decided = swapped = 0

    def challenger_share(preference, challenger_first: bool) -> float:
        if preference.winner == "tie":
            return 0.5
        return 1.0 if (preference.winner == "first") == challenger_first else 0.0

    for index in range(len(pairs)):
        mine, theirs = signalled[2 * index], signalled[2 * index + 1]
        if mine["failed"] or theirs["failed"]:
            preferences.append(None)
            continue
        challenger_first = rng.random() < 0.5
        order = (mine, theirs) if challenger_first else (theirs, mine)
        try:
            shares = [challenger_share(judge.compare(*order, rubric), challenger_first)]
            if index % swap_every == 0:
                again = judge.compare(order[1], order[0], rubric)
                shares.append(challenger_share(again, not challenger_first))
                swapped += 1
                first = (shares[0] == 1.0) if challenger_first else (shares[0] == 0.0)
                second_first = again.winner == "first"
                for won_first, tie in ((first, shares[0] == 0.5), (second_first, again.winner == "tie")):
                    if not tie:
                        decided += 1
                        first_wins += won_first
        except JudgeError:
            preferences.append(None)
            continue
        preferences.append(sum(shares) / len(shares))
    return {
        "preferences": preferences,
        "judge": judge.label,
        "swapped_pairs": swapped,
        "position_bias": first_wins / decided if decided else None,
    }


def shadow_pairs(records) -> list[tuple]:
    """(shadow record, production record) of every mirrored request whose both sides were captured:
    by the production event a shadow record names (this gateway), else by their shared
    ``inferenceId`` (SageMaker's capture; the replay gives every request its own)."""
    production = [r for r in records if not r.shadow]
    by_event = {r.event_id: r for r in production}
    by_inference = {r.inference_id: r for r in production if r.inference_id}
    pairs = []
    for record in records:
        if not record.shadow:
            continue
        source = by_event.get(record.source_event_id) if record.source_event_id else None
        if source is None and record.inference_id:
            source = by_inference.get(record.inference_id)
        if source is not None:
            pairs.append((record, source))
    return pairs


def mean(values) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None
