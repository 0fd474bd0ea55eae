"""The drift checks with the real sentence encoder on the bundled corpus: how often they raise a
false alarm on traffic from the training distribution (measured over repeated windows, and
stated), and that each kind of shift the issue names raises one."""

from __future__ import annotations

import random

import numpy as np
import pytest

from devtools import traffic
from llmops.drift import statistics as drift

pytestmark = [pytest.mark.integration, pytest.mark.model]

WINDOWS = 40
WINDOW_SIZE = 100
# With alpha = 0.01 per test and effect-size floors on top, the expected rate is about 1% or
# less; 3 alarms in 40 windows would already be unlikely (p < 0.01 at a true rate of 1%).
MAX_FALSE_ALARMS = 2


@pytest.fixture(scope="module")
def corpus():
    """The bundled corpus as curated prompts (rendered like llm_data_prep does), split 80/10/10,
    its baseline profile, and an embedder that caches (each prompt is encoded once)."""
    from llmops.config import load_settings
    from llmops.models import resolve_model
    from training.metrics import Embedder

    settings = load_settings("local")
    records = traffic.bundled_records(settings.data.template)
    random.Random(7).shuffle(records)
    n = len(records)
    train, validation, test = records[: int(0.8 * n)], records[int(0.8 * n) : int(0.9 * n)], records[int(0.9 * n) :]
    encoder = Embedder(resolve_model(settings.models.embedding, settings.models.cache_dir))
    cache: dict[str, np.ndarray] = {}

    def embed(texts):
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, encoder.encode(missing), strict=True))
        return np.stack([cache[t] for t in texts])

    profile = drift.build_profile(
        train, validation, embed, dataset="python-docs", dataset_version="test", encoder="minilm", seed=1
    )
    return {"profile": profile, "heldout": [r["prompt"] for r in validation + test], "embed": embed}


def calls(prompts):
    return [drift.TrafficRecord(p, "A short answer about Python.", 200, 80.0) for p in prompts]


def test_in_domain_traffic_false_alarm_rate(corpus, capsys):
    policy = drift.DriftPolicy()
    alarms, breaches = 0, {}
    for k in range(WINDOWS):
        window = random.Random(k).sample(corpus["heldout"], WINDOW_SIZE)
        report = drift.analyze(corpus["profile"], calls(window), policy, corpus["embed"], seed=k)
        alarms += report.verdict == drift.DRIFT
        for check in report.checks:
            if check.status == drift.BREACH:
                breaches[check.name] = breaches.get(check.name, 0) + 1
    with capsys.disabled():
        print(
            f"\ndrift false alarms on in-domain traffic: {alarms}/{WINDOWS} windows of {WINDOW_SIZE} "
            f"held-out prompts ({alarms / WINDOWS:.1%}); breaches by check: {breaches or 'none'}"
        )
    assert alarms <= MAX_FALSE_ALARMS, breaches


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("off-domain", {"embedding", "oov"}),
        ("de", {"embedding", "oov"}),
        ("es", {"embedding", "oov"}),
        ("ru", {"embedding", "oov", "script"}),
        ("longer", {"prompt_length"}),
    ],
)
def test_shifted_traffic_raises_an_alarm(corpus, kind, expected):
    if kind == "off-domain":
        prompts = traffic.off_domain_prompts(WINDOW_SIZE)
    elif kind == "longer":
        prompts = traffic.longer_prompts(corpus["heldout"], WINDOW_SIZE)
    else:
        prompts = traffic.foreign_prompts(WINDOW_SIZE, kind)
    report = drift.analyze(corpus["profile"], calls(prompts), drift.DriftPolicy(), corpus["embed"], seed=3)
    assert report.verdict == drift.DRIFT
    assert expected <= {c.name for c in report.checks if c.status == drift.BREACH}


def test_a_quarter_of_off_domain_traffic_is_still_noticed(corpus):
    prompts = traffic.off_domain_prompts(25) + random.Random(5).sample(corpus["heldout"], 75)
    report = drift.analyze(corpus["profile"], calls(prompts), drift.DriftPolicy(), corpus["embed"], seed=5)
    assert report.check("embedding").status == drift.BREACH
