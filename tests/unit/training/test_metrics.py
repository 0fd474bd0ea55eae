"""Per-response text metrics against values worked out by hand: ROUGE-L from the longest common
subsequence, BLEU from clipped n-gram precisions with sacrebleu's exp smoothing and effective order,
chrF from character n-grams, plus the heuristics (exact match, repetition, refusal) and the
sentence-embedding similarity on the packaged all-MiniLM-L6-v2 folder."""

from __future__ import annotations

import math

import pytest

from training import metrics
from training.metrics import (
    OPEN,
    SHORT_ANSWER,
    Embedder,
    bleu,
    chrf,
    exact_match,
    is_refusal,
    normalize_answer,
    repetition_rate,
    rouge_l,
    text_metrics,
)

CAT = "the cat sat on the mat"


# --- exact match ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" `3`. ", "3"),
        ('"3."', "3"),
        ("'Paris'", "paris"),
        ("``a``", "a"),
        ("  Hello\tWorld \n", "hello world"),
        ("New   York.", "new york"),
        ("３", "3"),  # fullwidth digit, folded by NFKC
        ("ﬁle", "file"),  # ligature, folded by NFKC
        ("3.5", "3.5"),  # a period inside is kept
        ("3..", "3."),  # only one trailing period goes
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        (" `3`. ", "3", 1.0),
        ("3", "4", 0.0),
        ("True", "true", 1.0),
        ('"O(n log n)."', "o(n  log n)", 1.0),
        ("3", "3.5", 0.0),
        ("list.sort()", "sorted()", 0.0),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


# --- ROUGE-L --------------------------------------------------------------------------------------------------


def test_rouge_l_one_substituted_word():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = F = 5/6.
    assert rouge_l(CAT, "the cat is on the mat") == pytest.approx(5 / 6)


def test_rouge_l_short_prediction():
    # LCS = 2; P = 2/2, R = 2/6; F = 2PR / (P + R) = (2/3) / (4/3) = 1/2.
    assert rouge_l("the cat", CAT) == pytest.approx(0.5)


def test_rouge_l_stems_and_ignores_case_and_punctuation():
    # Without the stemmer "cats" would not match "cat": LCS 2 of 3 gives 2/3.
    assert rouge_l("The cats sat!", "the cat sat") == pytest.approx(1.0)


def test_rouge_l_counts_words_in_order():
    # Reversed word order: LCS of "a b c d" and "d c b a" is one token; P = R = F = 1/4.
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)


@pytest.mark.parametrize(("prediction", "reference"), [("", CAT), (CAT, ""), ("  \n", CAT), (CAT, "\t")])
def test_rouge_l_empty_side_is_zero(prediction, reference):
    assert rouge_l(prediction, reference) == 0.0


def test_rouge_scorer_is_created_once():
    assert metrics._rouge_scorer() is metrics._rouge_scorer()


# --- BLEU -----------------------------------------------------------------------------------------------------


def test_bleu_identity_is_100():
    assert bleu(CAT, CAT) == pytest.approx(100.0)


def test_bleu_disjoint_is_zero_despite_smoothing():
    # No unigram matches at all: sacrebleu stops early with 0.0 instead of smoothing every order.
    assert bleu("alpha beta gamma delta", "one two three four") == 0.0


def test_bleu_one_substituted_word_uses_exp_smoothing():
    # Clipped matches / totals per order: 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat),
    # 3-grams 1/4 (on the mat), 4-grams 0/3 -> exp smoothing 1 / (2 * 3). Equal lengths, so no
    # brevity penalty: 100 * (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = 100 * (1/48) ** (1/4).
    assert bleu(CAT, "the cat is on the mat") == pytest.approx(100 * (1 / 48) ** 0.25)
    assert bleu(CAT, "the cat is on the mat") == pytest.approx(37.9918, abs=1e-4)


def test_bleu_smoothing_gives_credit_to_a_two_word_answer():
    # 1-grams 1/2; 2-grams 0/1 -> 1 / (2 * 1); orders 3 and 4 have no n-grams (effective order 2):
    # 100 * sqrt(1/2 * 1/2) = 50. Unsmoothed BLEU would be 0.
    assert bleu("the dog", "the cat") == pytest.approx(50.0)


def test_bleu_brevity_penalty():
    # Precisions 2/2 and 1/1 (effective order 2), but 2 words against 6: BP = exp(1 - 6/2).
    assert bleu("the cat", CAT) == pytest.approx(100 * math.exp(-2))


@pytest.mark.parametrize("prediction", ["", "   "])
def test_bleu_empty_prediction_is_zero(prediction):
    assert bleu(prediction, CAT) == 0.0


# --- chrF -----------------------------------------------------------------------------------------------------


def test_chrf_identity_is_100():
    assert chrf(CAT, CAT) == pytest.approx(100.0)


def test_chrf_no_shared_character_is_zero():
    assert chrf("abc", "xyz") == 0.0


def test_chrf_partial_match():
    # Character 1-grams: P = 2/2, R = 2/3; 2-grams: P = 1/1, R = 1/2; higher orders have no
    # prediction n-grams and are left out. Averages P = 1, R = 7/12; F(beta=2) = 5PR / (4P + R)
    # = (35/12) / (55/12) = 7/11.
    assert chrf("ab", "abc") == pytest.approx(100 * 7 / 11)


def test_chrf_ignores_whitespace():
    assert chrf("a b c", "abc") == pytest.approx(100.0)


@pytest.mark.parametrize("prediction", ["", " \n "])
def test_chrf_empty_prediction_is_zero(prediction):
    assert chrf(prediction, CAT) == 0.0


# --- repetition -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("a b c a b c", 3, 1 - 3 / 4),  # abc, bca, cab, abc
        ("a b a b a", 2, 1 - 2 / 4),  # ab, ba, ab, ba
        ("a a a b", 1, 1 - 2 / 4),
        ("a  \n a", 1, 1 - 1 / 2),  # any whitespace separates words
        ("A a", 1, 0.0),  # case-sensitive
        ("a b c d e", 3, 0.0),
        ("a b c", 3, 0.0),  # a single n-gram cannot repeat
        ("a b", 3, 0.0),  # fewer words than n
        ("", 1, 0.0),
        ("x x x x x x", 2, 1 - 1 / 5),
    ],
)
def test_repetition_rate(text, n, expected):
    assert repetition_rate(text, n) == pytest.approx(expected)


def test_repetition_rate_defaults_to_trigrams():
    # As bigrams "x y x y" would repeat (1 - 2/3); as trigrams xyx, yxy are unique.
    assert repetition_rate("x y x y") == 0.0
    assert repetition_rate("x y z x y z") == pytest.approx(0.25)


@pytest.mark.parametrize("n", [0, -1])
def test_repetition_rate_rejects_n_below_one(n):
    with pytest.raises(ValueError, match=f"n must be at least 1, got {n}"):
        repetition_rate("a b c", n)


# --- refusal --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I am sorry, but that is outside what I do.",
        "Sorry, but I won't write that.",
        "I cannot provide instructions for that.",
        "I can't help with that request.",
        "I can\u2019t assist with this.",  # typographic apostrophe
        "I won't assist with that.",
        "I will not answer this question.",
        "As an AI language model, I don't have personal opinions.",
        "AS AN AI, I have no feelings about tabs versus spaces.",
        "I am unable to browse the internet.",
        "I'm unable to run code.",
        "I'm not able to execute Python for you.",
        "I do not have access to your files.",
        "I don't have the ability to see your screen.",
        "I'm not allowed to share that.",
        "I must decline this request.",
        "\n\n   I'm sorry, but I can't do that.",
        "Thanks for asking. Unfortunately I cannot help with that.",
    ],
)
def test_refusals_are_flagged(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "A tuple cannot be modified after creation.",
        "You cannot change a string in place; build a new one with str.join.",
        "The interpreter cannot find the module, so it raises ModuleNotFoundError.",
        "Dictionary keys cannot be lists because lists are unhashable.",
        "If I cannot reproduce the bug, I add logging first.",
        "Sorry, I misread the question: use list.sort() to sort in place.",
        "A generator can't be rewound; call the generator function again.",
        "Use sorted(pairs, key=lambda p: p[1]); it returns a new list.",
        "Python is not able to optimise tail calls.",
        "",
    ],
)
def test_ordinary_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_refusal_phrase_deep_inside_an_answer_is_not_a_refusal():
    answer = "Use a context manager so the file is closed even when an exception is raised. " * 3
    assert len(answer) > metrics.REFUSAL_WINDOW
    assert not is_refusal(answer + "I'm sorry, but I can't help with anything else.")
    assert is_refusal("I'm sorry, but I can't help with anything else. " + answer)


# --- text_metrics ---------------------------------------------------------------------------------------------

KEYS = {"rouge_l", "bleu", "chrf", "exact_match", "repetition", "refusal", "response_words"}


def test_text_metrics_of_an_open_answer():
    result = text_metrics(CAT, "the cat is on the mat", OPEN)
    assert set(result) == KEYS
    assert result["exact_match"] is None
    assert result["rouge_l"] == pytest.approx(5 / 6)
    assert result["bleu"] == pytest.approx(100 * (1 / 48) ** 0.25)
    assert result["chrf"] == pytest.approx(chrf(CAT, "the cat is on the mat"))
    assert 0.0 < result["chrf"] < 100.0
    assert result["repetition"] == 0.0
    assert result["refusal"] == 0.0
    assert result["response_words"] == 6.0
    assert all(isinstance(value, float) for key, value in result.items() if key != "exact_match")


def test_text_metrics_of_a_short_answer():
    assert text_metrics(" `3`. ", "3", SHORT_ANSWER)["exact_match"] == 1.0
    result = text_metrics("4", "3", SHORT_ANSWER)
    assert set(result) == KEYS
    assert result["exact_match"] == 0.0
    assert result["response_words"] == 1.0


def test_text_metrics_of_a_repetitive_refusal():
    result = text_metrics("I can't help with that. I can't help with that.", "Use a set.", OPEN)
    assert result["refusal"] == 1.0
    # 10 words, 8 trigrams; "I can't help", "can't help with", "help with that." come back once each.
    assert result["repetition"] == pytest.approx(1 - 5 / 8)
    assert result["response_words"] == 10.0


def test_text_metrics_of_an_empty_prediction():
    result = text_metrics("", "the answer", OPEN)
    assert result == {
        "rouge_l": 0.0,
        "bleu": 0.0,
        "chrf": 0.0,
        "exact_match": None,
        "repetition": 0.0,
        "refusal": 0.0,
        "response_words": 0.0,
    }


def test_text_metrics_rejects_an_unknown_kind():
    with pytest.raises(ValueError) as info:
        text_metrics("3", "3", "essay")
    message = str(info.value)
    assert "'essay'" in message
    assert SHORT_ANSWER in message
    assert OPEN in message


# --- Embedder without a model ---------------------------------------------------------------------------------


def test_embedder_names_a_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Embedder(str(missing))


def test_embedder_rejects_a_batch_size_below_one(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(str(tmp_path), batch_size=0)


# An existing folder with no model in it: any call that loads the model would fail, so these
# tests show the model is loaded lazily and only when there is something to encode.


def test_embedder_loads_lazily(tmp_path):
    embedder = Embedder(str(tmp_path))
    empty = embedder.encode([])
    assert empty.shape == (0, 0)
    assert embedder.similarity([], []) == []
    assert embedder.similarity(["", "x"], ["y", "  "]) == [0.0, 0.0]


def test_embedder_similarity_rejects_lists_of_different_lengths(tmp_path):
    with pytest.raises(ValueError, match="equal length, got 2 and 1"):
        Embedder(str(tmp_path)).similarity(["a", "b"], ["a"])


def test_embedder_rejects_a_bare_string(tmp_path):
    with pytest.raises(TypeError, match="list of strings"):
        Embedder(str(tmp_path)).encode("a sentence")


# --- Embedder with all-MiniLM-L6-v2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from llmops.models import resolve_model

    # The packaged model is used in place; the cache folder stays empty.
    return Embedder(str(resolve_model("all-minilm-l6-v2", tmp_path_factory.mktemp("models"))), batch_size=2)


SORT = "How do I sort a list in Python?"
SORT_PARAPHRASE = "What is the way to order a Python list?"
WEATHER = "The weather in Paris is sunny today."


@pytest.mark.model
def test_encode_gives_unit_rows(embedder):
    import numpy as np

    vectors = embedder.encode([SORT, SORT_PARAPHRASE, WEATHER])
    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.model
def test_encode_normalizes_a_model_that_does_not(embedder, tmp_path):
    import json

    import numpy as np

    # all-MiniLM-L6-v2 ends in its own Normalize module; the same model without it gives raw
    # mean-pooled vectors, so only the Embedder can make these rows unit length.
    for entry in embedder.model_dir.iterdir():
        if entry.name != "modules.json":
            (tmp_path / entry.name).symlink_to(entry)
    modules = json.loads((embedder.model_dir / "modules.json").read_text())
    (tmp_path / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    raw = Embedder(str(tmp_path))
    norms = np.linalg.norm(raw.encode([SORT, WEATHER]), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    unnormalized = raw._load().encode([SORT, WEATHER], convert_to_numpy=True, show_progress_bar=False)
    assert not np.allclose(np.linalg.norm(unnormalized, axis=1), 1.0, atol=1e-2)


@pytest.mark.model
def test_similarity_ranks_a_paraphrase_above_an_unrelated_sentence(embedder):
    identical, paraphrase, unrelated = embedder.similarity([SORT, SORT, SORT], [SORT, SORT_PARAPHRASE, WEATHER])
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert identical <= 1.0
    assert paraphrase > 0.6
    assert unrelated < 0.3
    assert paraphrase > unrelated + 0.3


@pytest.mark.model
def test_similarity_is_the_dot_product_of_the_encodings_in_pair_order(embedder):
    import numpy as np

    a, b = [SORT, WEATHER, SORT_PARAPHRASE], [WEATHER, WEATHER, SORT]
    va, vb = embedder.encode(a), embedder.encode(b)
    expected = [float(np.dot(va[i], vb[i])) for i in range(3)]
    assert embedder.similarity(a, b) == pytest.approx(expected, abs=1e-5)


@pytest.mark.model
def test_similarity_scores_a_pair_with_an_empty_side_zero(embedder):
    scores = embedder.similarity([SORT, "", SORT, "  "], [SORT_PARAPHRASE, SORT, "", WEATHER])
    assert scores[0] > 0.6
    assert scores[1:] == [0.0, 0.0, 0.0]
