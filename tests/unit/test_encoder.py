"""The numpy sentence encoder: the same vectors as sentence-transformers on the real
all-MiniLM-L6-v2, without torch; and the runtime ``make_sentence_encoder`` picks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmops.encoder import SentenceEncoder

ROOT = Path(__file__).resolve().parents[2]
HIDE_TORCH = (
    "import sys\nfor name in ('torch', 'transformers', 'sentence_transformers'):\n    sys.modules[name] = None\n"
)

LONG = " ".join(f"Paragraph {i}: the interpreter evaluates each expression and binds the result." for i in range(60))
SAMPLE = [
    "",
    "   ",
    "a",
    "How do I sort a list in Python?",
    "What is the way to order a Python list?",
    "The weather in Paris is sunny today.",
    "Naïve café, Straße, ﬁnance, Ångström: ÀÉÎÕÜ and àéîõü.",
    "日本語の文章と中文句子，还有한국어 문장도 있습니다。",
    "Emoji 🙂🚀🐍 and symbols ∑∫√≤≥ ≠ ∞ and a zero\u200bwidth space.",
    "def f(x):\n\treturn {'key': [x ** 2 for x in range(10)]}  # code",
    "UPPER CASE and lower case and MiXeD cAsE",
    "https://docs.python.org/3/library/functions.html#sorted?x=1&y=2",
    LONG,
    "Short one after a long one.",
    "word " * 300,
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from llmops.models import resolve_model

    return resolve_model("all-minilm-l6-v2", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def encoder(model_dir) -> SentenceEncoder:
    # Small batches: the sample spans several, each padded to its own longest text.
    return SentenceEncoder(model_dir, batch_size=4)


# --- without a model ---------------------------------------------------------------------------------


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        SentenceEncoder(tmp_path / "no-such-model")


def test_a_batch_size_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        SentenceEncoder(tmp_path, batch_size=0)


def test_nothing_is_loaded_until_there_is_something_to_encode(tmp_path):
    # The folder holds no model: any call that loaded it would fail.
    encoder = SentenceEncoder(tmp_path)
    assert encoder.encode([]).shape == (0, 0)
    assert encoder.similarity([], []) == []
    assert encoder.similarity(["", "x"], ["y", "  "]) == [0.0, 0.0]


def test_a_bare_string_and_uneven_pairs_are_refused(tmp_path):
    with pytest.raises(TypeError, match="list of strings"):
        SentenceEncoder(tmp_path).encode("a sentence")
    with pytest.raises(ValueError, match="equal length, got 2 and 1"):
        SentenceEncoder(tmp_path).similarity(["a", "b"], ["a"])


def test_a_folder_with_a_module_it_does_not_implement_is_refused(model_dir, tmp_path):
    for entry in model_dir.iterdir():
        if entry.name != "modules.json":
            (tmp_path / entry.name).symlink_to(entry)
    modules = json.loads((model_dir / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"Dense.*embedding_runtime: torch"):
        SentenceEncoder(tmp_path).encode(["x"])


# --- all-MiniLM-L6-v2 against sentence-transformers ---------------------------------------------------------


@pytest.mark.model
def test_the_sample_exercises_truncation(model_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    max_seq_length = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    assert max_seq_length == 256
    assert max(len(tokenizer.encode(t).ids) for t in SAMPLE) > 2 * max_seq_length


@pytest.mark.model
def test_vectors_match_sentence_transformers(model_dir, encoder):
    import numpy as np

    from training.metrics import Embedder

    expected = Embedder(model_dir).encode(SAMPLE)
    got = encoder.encode(SAMPLE)
    assert got.shape == expected.shape == (len(SAMPLE), 384)
    assert got.dtype == np.float32
    cosines = np.einsum("ij,ij->i", got, expected) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosines.min() >= 0.9999, dict(zip(SAMPLE, cosines.round(6), strict=True))
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.model
def test_rows_are_unit_length_and_independent_of_batching(model_dir, encoder):
    import numpy as np

    vectors = encoder.encode(SAMPLE)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one_by_one = SentenceEncoder(model_dir, batch_size=1).encode(SAMPLE)
    assert np.abs(vectors - one_by_one).max() < 1e-5
    # A text beyond max_seq_length is cut there: what follows changes nothing.
    longer = encoder.encode([LONG, LONG + " And a sentence about something else entirely."])
    assert np.abs(longer[0] - longer[1]).max() < 1e-6


@pytest.mark.model
def test_similarity_ranks_a_paraphrase_above_an_unrelated_sentence(encoder):
    sort, paraphrase, weather = SAMPLE[3], SAMPLE[4], SAMPLE[5]
    identical, close, unrelated = encoder.similarity([sort, sort, sort], [sort, paraphrase, weather])
    assert identical == pytest.approx(1.0, abs=1e-5)
    assert close > 0.6
    assert unrelated < 0.3


# --- the runtime ---------------------------------------------------------------------------------


def with_runtime(settings, runtime: str):
    return settings.model_copy(update={"models": settings.models.model_copy(update={"embedding_runtime": runtime})})


def test_the_runtime_setting_picks_the_encoder(settings, monkeypatch):
    from llmops.config import ConfigError
    from llmops.drift import monitor as monitoring
    from training.metrics import Embedder

    assert settings.models.embedding_runtime == "auto"
    assert isinstance(monitoring.make_sentence_encoder(with_runtime(settings, "numpy")), SentenceEncoder)
    assert isinstance(monitoring.make_sentence_encoder(with_runtime(settings, "torch")), Embedder)
    assert isinstance(monitoring.make_sentence_encoder(settings), Embedder), "auto takes torch when it is here"
    monkeypatch.setitem(sys.modules, "torch", None)
    assert isinstance(monitoring.make_sentence_encoder(settings), SentenceEncoder), "and numpy when it is not"
    with pytest.raises(ConfigError, match="embedding_runtime is 'torch'"):
        monitoring.make_sentence_encoder(with_runtime(settings, "torch"))


def test_the_aws_settings_embed_with_numpy():
    import yaml

    aws = yaml.safe_load((ROOT / "include" / "config" / "aws.yaml").read_text())
    assert aws["models"]["embedding_runtime"] == "numpy"


@pytest.mark.model
def test_make_embedder_works_without_torch(model_dir):
    """As on an MWAA worker: torch, transformers and sentence-transformers cannot be imported."""
    import numpy as np

    from training.metrics import Embedder

    script = HIDE_TORCH + (
        "import json\n"
        "from llmops.config import load_settings\n"
        "from llmops.drift.monitor import make_embedder\n"
        f"vectors = make_embedder(load_settings('local'))({SAMPLE[2:6]!r})\n"
        "print(json.dumps(vectors.tolist()))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    vectors = np.array(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float32)
    assert np.abs(vectors - Embedder(model_dir).encode(SAMPLE[2:6])).max() < 1e-5
