"""Synthetic traffic (``devtools.traffic``): deterministic per seed, exactly ``count`` prompts."""

from __future__ import annotations

import re

import pytest

from devtools import traffic
from llmops.drift.text import script_counts, words

IN_DOMAIN = [
    "How do I reverse a list in Python?",
    "Explain decorators in Python.",
    "What does enumerate return?",
]


@pytest.mark.parametrize("count", [0, 1, 17, 300])
def test_off_domain_prompts_count_and_determinism(count):
    prompts = traffic.off_domain_prompts(count, seed=3)
    assert len(prompts) == count
    assert prompts == traffic.off_domain_prompts(count, seed=3)
    assert all(isinstance(p, str) and p for p in prompts)


def test_off_domain_prompts_depend_on_the_seed_and_are_not_about_python():
    a, b = traffic.off_domain_prompts(50, seed=0), traffic.off_domain_prompts(50, seed=1)
    assert a != b
    assert len(set(a)) == 50  # the pool (252 questions) is shuffled, not sampled with repeats
    assert not any("python" in words(p) for p in a + b)
    assert traffic.off_domain_prompts(10) == traffic.off_domain_prompts(10, seed=0)


def test_off_domain_prompts_cycle_the_pool_beyond_its_size():
    prompts = traffic.off_domain_prompts(300, seed=2)
    assert len(set(prompts)) == 252
    assert prompts[252:] == prompts[:48]


@pytest.mark.parametrize("language", traffic.LANGUAGES)
def test_foreign_prompts_count_and_determinism(language):
    prompts = traffic.foreign_prompts(40, language, seed=5)
    assert len(prompts) == 40
    assert prompts == traffic.foreign_prompts(40, language, seed=5)
    assert prompts != traffic.foreign_prompts(40, language, seed=6)
    assert all(len(p) > 20 for p in prompts)
    assert len(set(prompts)) > 5  # several questions and tails, not one repeated


def test_foreign_prompts_are_in_the_language():
    russian = script_counts(traffic.foreign_prompts(30, "ru", seed=0))
    assert russian["cyrillic"] > 5 * russian["latin"]
    german = " ".join(traffic.foreign_prompts(30, "de", seed=0)).lower()
    assert re.search(r"\b(wie|was|ich|eine)\b", german)
    spanish = traffic.foreign_prompts(30, "es", seed=0)
    assert any(p.startswith("¿") for p in spanish)
    assert traffic.foreign_prompts(0, "es") == []


def test_default_language_is_german():
    assert traffic.foreign_prompts(10, seed=1) == traffic.foreign_prompts(10, "de", seed=1)


@pytest.mark.parametrize("language", ["fr", "DE", "", "russian"])
def test_foreign_prompts_reject_an_unknown_language_naming_the_allowed_ones(language):
    with pytest.raises(ValueError, match=r"one of de, es, ru, got " + re.escape(repr(language))):
        traffic.foreign_prompts(5, language)


def test_longer_prompts_are_in_domain_and_several_times_longer():
    prompts = traffic.longer_prompts(IN_DOMAIN, 20, factor=6, seed=1)
    assert len(prompts) == 20
    assert prompts == traffic.longer_prompts(IN_DOMAIN, 20, factor=6, seed=1)
    assert prompts != traffic.longer_prompts(IN_DOMAIN, 20, factor=6, seed=2)
    mean_in = sum(map(len, IN_DOMAIN)) / len(IN_DOMAIN)
    mean_out = sum(map(len, prompts)) / len(prompts)
    assert mean_out > 4 * mean_in
    for prompt in prompts:
        head, pasted = prompt.split("\n\nHere is what I have so far:\n\n")
        assert head in IN_DOMAIN
        parts = pasted.split("\n\n")
        assert len(parts) == 5 and set(parts) <= set(IN_DOMAIN)


def test_longer_prompts_grow_with_the_factor():
    short = traffic.longer_prompts(IN_DOMAIN, 30, factor=2, seed=0)
    long = traffic.longer_prompts(IN_DOMAIN, 30, factor=10, seed=0)
    assert sum(map(len, long)) > 3 * sum(map(len, short))
    assert traffic.longer_prompts(IN_DOMAIN, 0) == []


@pytest.mark.parametrize("empty", [[], ()])
def test_longer_prompts_reject_empty_input(empty):
    with pytest.raises(ValueError, match="needs prompts"):
        traffic.longer_prompts(empty, 3)
