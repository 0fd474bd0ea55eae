"""Per-response text metrics for the model evaluation job.

Each function scores one model response against one reference answer; the evaluation job
aggregates them over a test set. Standard metrics come from their maintained implementations
(``rouge_score`` for ROUGE-L, ``sacrebleu`` for BLEU and chrF) so the numbers match what other
tools report. The remaining heuristics (exact match on normalized answers, n-gram repetition,
refusal detection) are small enough to live here, and :class:`Embedder` gives sentence-embedding
similarity with a local sentence-transformers folder, never a hub download.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sacrebleu

if TYPE_CHECKING:
    import numpy

SHORT_ANSWER = "short_answer"
OPEN = "open"
KINDS = (SHORT_ANSWER, OPEN)

_QUOTES = "'\"`"
# Whitespace and quote characters around an answer; stripped together because models wrap short
# answers in either order (" `3` ", "`3 `").
_EDGES = re.compile(rf"^[\s{re.escape(_QUOTES)}]+|[\s{re.escape(_QUOTES)}]+$")

# Refusals announce themselves up front; looking only at the opening keeps a quoted error message or
# a closing caveat deep inside a real answer from counting as a refusal.
REFUSAL_WINDOW = 200
_I = r"\bI(?:'m|\s+am)"
_REFUSAL_PATTERNS = [
    # "I can't help", "I cannot provide", "I won't assist", "I will not answer": the verb list keeps
    # technical first-person sentences ("I can't reproduce this on 3.12") out.
    r"\bI\s+(?:can(?:'t|not|\s+not)|won't|will\s+not)\s+"
    r"(?:help|assist|answer|provide|comply|fulfil+|share|give|do\s+that|support|engage|discuss)\b",
    # "I'm sorry, but ...", "Sorry, but ..."; a bare apology ("Sorry, I misread the question") is not
    # a refusal, and "Sorry, I can't help" is caught by the pattern above.
    rf"(?:{_I}\s+|^)(?:so\s+|very\s+|truly\s+)?sorry\s*,?\s+but\b",
    r"\bas\s+an\s+AI\b",
    rf"{_I}\s+(?:unable|not\s+able)\s+to\b",
    r"\bI\s+(?:do\s+not|don't)\s+have\s+(?:access|the\s+ability)\b",
    rf"{_I}\s+not\s+(?:allowed|permitted)\s+to\b",
    r"\bI\s+(?:must|have\s+to)\s+(?:decline|refuse)\b",
]
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in _REFUSAL_PATTERNS), re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """The form two short answers are compared in: NFKC, lowercase, without surrounding whitespace,
    quotes or backticks, without one trailing period, internal whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _EDGES.sub("", text)
    if text.endswith("."):
        text = text[:-1]
    # Stripping again covers a period outside the quotes ('`3`.') as well as inside ('"3."').
    text = _EDGES.sub("", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized prediction equals the normalized reference, else 0.0."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(reference) else 0.0


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # Importing rouge_score pulls in nltk (seconds), and the stemmer-backed scorer is stateless, so
    # one instance serves every call.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] (longest common subsequence of Porter-stemmed tokens).

    rouge_score's tokenizer lowercases and keeps only ASCII letters and digits, so text in
    non-Latin scripts scores 0.0 against itself."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def bleu(prediction: str, reference: str) -> float:
    """Sentence-level BLEU in [0, 100] with sacrebleu's defaults for single sentences.

    Those defaults matter for short answers: 'exp' smoothing gives an n-gram order with no match
    the precision 100 / (2^k * total) (k counting such orders) instead of zeroing the whole score,
    and the effective order drops n-gram orders the prediction is too short to have. A prediction
    sharing no word with the reference still scores 0.0."""
    if not prediction.strip():
        return 0.0
    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def chrf(prediction: str, reference: str) -> float:
    """Sentence-level chrF in [0, 100] (character 1- to 6-grams, whitespace ignored, beta = 2)."""
    if not prediction.strip():
        return 0.0
    return float(sacrebleu.sentence_chrf(prediction, [reference]).score)


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier one: 1 - unique / total.

    0.0 for a text of fewer than ``n`` words; a model stuck in a loop approaches 1.0."""
    if n < 1:
        raise ValueError(f"repetition_rate: n must be at least 1, got {n}")
    words = text.split()
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def is_refusal(text: str) -> bool:
    """True when the response declines to answer ("I can't help with that", "As an AI language
    model", "I'm sorry, but ..."), judged on its opening characters only."""
    # Models emit typographic apostrophes as often as ASCII ones.
    opening = text.strip()[:REFUSAL_WINDOW].replace("\u2019", "'")
    return _REFUSAL.search(opening) is not None


def text_metrics(prediction: str, reference: str, kind: str) -> dict[str, float | None]:
    """Every per-response text metric of one item; ``exact_match`` is None unless the item is a short answer."""
    if kind not in KINDS:
        raise ValueError(f"unknown item kind {kind!r}; expected one of {', '.join(KINDS)}")
    return {
        "rouge_l": rouge_l(prediction, reference),
        "bleu": bleu(prediction, reference),
        "chrf": chrf(prediction, reference),
        "exact_match": exact_match(prediction, reference) if kind == SHORT_ANSWER else None,
        "repetition": repetition_rate(prediction),
        "refusal": 1.0 if is_refusal(prediction) else 0.0,
        "response_words": float(len(prediction.split())),
    }


def pair_similarity(encode, a: list[str], b: list[str]) -> list[float]:
    """Cosine similarity of each pair a[i], b[i] under ``encode`` (texts to unit-length rows); 0.0
    for a pair with an empty (or blank) side. Shared by every sentence encoder."""
    import numpy as np

    if isinstance(a, str) or isinstance(b, str):
        raise TypeError("similarity takes two lists of strings, not single strings")
    if len(a) != len(b):
        raise ValueError(f"similarity needs lists of equal length, got {len(a)} and {len(b)}")
    scores = [0.0] * len(a)
    # An empty response has no meaning to compare, yet the model would still embed it
    # (special tokens only) close to other short texts; such pairs are scored 0.0 and not encoded.
    pairs = [i for i in range(len(a)) if a[i].strip() and b[i].strip()]
    if not pairs:
        return scores
    # One encode call for both sides fills the batches better than two.
    vectors = encode([a[i] for i in pairs] + [b[i] for i in pairs])
    left, right = vectors[: len(pairs)], vectors[len(pairs) :]
    # Rows are unit length, so the dot product is the cosine; float32 rounding can put it a hair
    # past +-1.
    cosines = np.clip(np.einsum("ij,ij->i", left, right), -1.0, 1.0)
    for i, cosine in zip(pairs, cosines, strict=True):
        scores[i] = float(cosine)
    return scores


class Embedder:
    """Sentence embeddings with a local sentence-transformers model folder (e.g. all-MiniLM-L6-v2)."""

    def __init__(self, model_dir: str | Path, batch_size: int = 32, device: str = "cpu") -> None:
        # The folder is checked now, the model loaded on first use: a wrong path fails at once,
        # while a job that ends up scoring nothing never pays for loading torch and the weights.
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"sentence-transformers model folder not found: {self.model_dir}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_dir), device=self.device, local_files_only=True)
        return self._model

    def encode(self, texts: list[str]) -> numpy.ndarray:
        """L2-normalized embeddings, one row per text: shape (len(texts), dim); (0, 0) for no texts."""
        import numpy as np

        # A bare string is a sequence too, and would be embedded character by character.
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        if len(texts) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        vectors = self._load().encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of each pair a[i], b[i]; 0.0 for a pair with an empty (or blank) side."""
        return pair_similarity(self.encode, a, b)
