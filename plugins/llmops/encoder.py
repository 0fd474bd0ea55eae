"""Sentence embeddings without torch: a BERT sentence-transformers folder (all-MiniLM-L6-v2) run in numpy.

Airflow workers on Amazon MWAA have no torch, yet drift baselines and drift windows embed text
there. :class:`SentenceEncoder` reads the same folder sentence-transformers does
(``model.safetensors`` with ``safetensors.numpy``, ``tokenizer.json`` with ``tokenizers``,
``sentence_bert_config.json``, ``modules.json``, ``1_Pooling/config.json``) and gives the same
vectors as :class:`training.metrics.Embedder` within float32 rounding (``tests/unit/test_encoder.py``
checks it against the real model), with the same ``encode`` and ``similarity`` contract. Only
numpy, tokenizers and safetensors are used, imported when the model is loaded.

    python -m llmops.encoder "first sentence" "second sentence"   # print their cosine similarity
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops.config import ConfigError, Settings, get_settings
from llmops.models import resolve_model
from training.metrics import Embedder, pair_similarity

if TYPE_CHECKING:
    import numpy

# Sentence-transformers modules this encoder implements; a folder with others (a Dense head, say)
# needs the torch runtime.
_MODULES = {"Transformer", "Pooling", "Normalize"}
# Tokens per feed-forward block: its wide activation stays in cache (256 to 1024 measured alike,
# and faster than a whole batch at once).
_FFN_ROWS = 512
_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}


def _gelu(x: numpy.ndarray) -> numpy.ndarray:
    """BERT's "gelu": the exact (erf) form, not the tanh approximation, in place on float32 buffers.

    erf is Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, under float32 resolution near 1).
    With y = (1 - erf(|z|)) / 2 and z = x / sqrt(2): gelu(x) = x (1 + erf(z)) / 2 is x (1 - y) for
    x >= 0 and x y for x < 0."""
    import numpy as np

    a = np.abs(x)
    a *= np.float32(0.7071067811865476)
    t = a * np.float32(0.3275911)
    t += np.float32(1)
    np.reciprocal(t, out=t)
    y = t * np.float32(1.061405429)
    for coefficient in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        y += np.float32(coefficient)
        y *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    y *= a
    y *= np.float32(0.5)
    np.subtract(np.float32(1), y, out=y, where=x >= 0)
    y *= x
    return y


def _layer_norm(x: numpy.ndarray, weight: numpy.ndarray, bias: numpy.ndarray, eps: float) -> numpy.ndarray:
    import numpy as np

    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = np.square(centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(variance + np.float32(eps)) * weight + bias


class _Bert:
    """BERT's encoder (post-LayerNorm, absolute positions) over a batch of token ids; the pooler head
    is not used by sentence-transformers and is not loaded."""

    def __init__(self, folder: Path) -> None:
        import numpy as np
        from safetensors.numpy import load_file

        config = json.loads((folder / "config.json").read_text())
        problems = [
            f"{key}={config.get(key, default)!r}"
            for key, default, wanted in (
                ("model_type", None, "bert"),
                ("hidden_act", "gelu", "gelu"),
                ("position_embedding_type", "absolute", "absolute"),
            )
            if config.get(key, default) != wanted
        ]
        if problems:
            raise ValueError(f"{folder}: the numpy encoder runs BERT with exact GELU only, got {', '.join(problems)}")
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_positions = int(config["max_position_embeddings"])
        weights = load_file(str(folder / "model.safetensors"))
        # Some folders keep the names of the task model the encoder came from ("bert.encoder...").
        prefix = next((p for p in ("", "bert.", "model.") if f"{p}embeddings.word_embeddings.weight" in weights), None)
        if prefix is None:
            raise ValueError(f"{folder / 'model.safetensors'} holds no BERT embeddings.word_embeddings.weight")

        def w(name: str) -> numpy.ndarray:
            return np.ascontiguousarray(weights[prefix + name], dtype=np.float32)

        def linear(name: str) -> tuple[numpy.ndarray, numpy.ndarray]:
            # Stored as (out, in); kept as (in, out) so activations multiply on the left.
            return np.ascontiguousarray(w(f"{name}.weight").T), w(f"{name}.bias")

        self.word, self.position, self.token_type = (
            w("embeddings.word_embeddings.weight"),
            w("embeddings.position_embeddings.weight"),
            w("embeddings.token_type_embeddings.weight"),
        )
        self.embedding_norm = (w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            q, k, v = (linear(f"{p}attention.self.{n}") for n in ("query", "key", "value"))
            # Attention scores are q.k / sqrt(head_dim): the query projection takes the scale once.
            scale = np.float32(1.0 / np.sqrt(int(config["hidden_size"]) // self.heads))
            q = (q[0] * scale, q[1] * scale)
            self.layers.append(
                {
                    # One (hidden, 3 * hidden) product instead of three.
                    "qkv": (np.concatenate([q[0], k[0], v[0]], axis=1), np.concatenate([q[1], k[1], v[1]])),
                    "attention_out": linear(f"{p}attention.output.dense"),
                    "attention_norm": (
                        w(f"{p}attention.output.LayerNorm.weight"),
                        w(f"{p}attention.output.LayerNorm.bias"),
                    ),
                    "intermediate": linear(f"{p}intermediate.dense"),
                    "output": linear(f"{p}output.dense"),
                    "output_norm": (w(f"{p}output.LayerNorm.weight"), w(f"{p}output.LayerNorm.bias")),
                }
            )

    def __call__(self, ids: numpy.ndarray, mask: numpy.ndarray, type_ids: numpy.ndarray) -> numpy.ndarray:
        """Token embeddings (batch, length, hidden) of right-padded ids; ``mask`` is 1 on real tokens."""
        import numpy as np

        batch, length = ids.shape
        hidden = self.word.shape[1]
        head_dim = hidden // self.heads
        x = self.word[ids] + self.position[:length][None] + self.token_type[type_ids]
        x = _layer_norm(x, *self.embedding_norm, self.eps).reshape(batch * length, hidden)
        # Padding is hidden from every query as transformers does it: the dtype's minimum added to its scores.
        bias = np.where(mask[:, None, None, :] > 0, np.float32(0), np.finfo(np.float32).min)
        for layer in self.layers:
            qkv = x @ layer["qkv"][0]
            qkv += layer["qkv"][1]
            heads = qkv.reshape(batch, length, 3, self.heads, head_dim)
            # Contiguous (batch, heads, ...) operands let every per-head product run as one BLAS call.
            q = np.ascontiguousarray(heads[:, :, 0].transpose(0, 2, 1, 3))
            k = np.ascontiguousarray(heads[:, :, 1].transpose(0, 2, 3, 1))
            v = np.ascontiguousarray(heads[:, :, 2].transpose(0, 2, 1, 3))
            scores = q @ k
            scores += bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores *= np.reciprocal(scores.sum(axis=-1, keepdims=True))
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * length, hidden)
            attended = context @ layer["attention_out"][0] + layer["attention_out"][1]
            x = _layer_norm(attended + x, *layer["attention_norm"], self.eps)
            # The feed-forward in blocks of rows: its wide activation stays in cache and is never
            # whole in memory.
            ffn = np.empty_like(x)
            for start in range(0, len(x), _FFN_ROWS):
                inner = x[start : start + _FFN_ROWS] @ layer["intermediate"][0]
                inner += layer["intermediate"][1]
                np.matmul(_gelu(inner), layer["output"][0], out=ffn[start : start + _FFN_ROWS])
            ffn += layer["output"][1]
            x = _layer_norm(ffn + x, *layer["output_norm"], self.eps)
        return x.reshape(batch, length, hidden)


class SentenceEncoder:
    """Sentence embeddings of a local sentence-transformers BERT folder, computed with numpy."""

    def __init__(self, model_dir: str | Path, batch_size: int = 32) -> None:
        # Same checks and laziness as training.metrics.Embedder: a wrong path fails now, the weights load on first use.
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"sentence-transformers model folder not found: {self.model_dir}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self._loaded: tuple[Any, _Bert, str, bool] | None = None

    def _read(self, name: str, default: Any = None) -> Any:
        path = self.model_dir / name
        return json.loads(path.read_text()) if path.is_file() else default

    def _load(self) -> tuple[Any, _Bert, str, bool]:
        if self._loaded is not None:
            return self._loaded
        from tokenizers import Tokenizer

        modules = self._read("modules.json", [])
        unknown = sorted(m["type"] for m in modules if m["type"].rsplit(".", 1)[-1] not in _MODULES)
        if unknown:
            raise ValueError(
                f"{self.model_dir}: the numpy encoder implements {', '.join(sorted(_MODULES))} only,"
                f" not {', '.join(unknown)};"
                " use models.embedding_runtime: torch"
            )
        pooling_dir = next((m["path"] for m in modules if m["type"].endswith("Pooling")), "1_Pooling")
        pooling_config = self._read(f"{pooling_dir}/config.json", {"pooling_mode_mean_tokens": True})
        modes = [mode for key, mode in _POOLING.items() if pooling_config.get(key)]
        others = [k for k, v in pooling_config.items() if k.startswith("pooling_mode_") and v and k not in _POOLING]
        if len(modes) != 1 or others:
            raise ValueError(
                f"{self.model_dir}: the numpy encoder pools with exactly one of cls, mean or max, got {pooling_config}"
            )
        model = _Bert(self.model_dir)
        sbert = self._read("sentence_bert_config.json", {})
        max_length = min(int(sbert.get("max_seq_length") or model.max_positions), model.max_positions)
        tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        # tokenizer.json may carry its own padding and truncation (this one pads everything to 128):
        # sentence-transformers replaces them with truncation at max_seq_length and per-batch padding.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_length)
        self._loaded = (tokenizer, model, modes[0], bool(sbert.get("do_lower_case")))
        return self._loaded

    def _embed_batch(self, texts: list[str]) -> numpy.ndarray:
        import numpy as np

        tokenizer, model, pooling, lower = self._load()
        encodings = tokenizer.encode_batch([t.lower() for t in texts] if lower else texts, add_special_tokens=True)
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), length), dtype=np.int64)
        type_ids = np.zeros_like(ids)
        mask = np.zeros((len(texts), length), dtype=np.float32)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n], type_ids[row, :n], mask[row, :n] = encoding.ids, encoding.type_ids, 1.0
        tokens = model(ids, mask, type_ids)
        if pooling == "cls":
            return tokens[:, 0]
        if pooling == "max":
            return np.where(mask[..., None] > 0, tokens, np.finfo(np.float32).min).max(axis=1)
        return (tokens * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)

    def encode(self, texts: list[str]) -> numpy.ndarray:
        """L2-normalized float32 embeddings, one row per text: shape (len(texts), dim); (0, 0) for no texts."""
        import numpy as np

        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        # Longest first, as sentence-transformers batches: similar lengths waste little on padding.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: numpy.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            vectors = self._embed_batch([texts[i] for i in rows])
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            # The Embedder always asks sentence-transformers to normalize (its Normalize module or not).
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            out[rows] = vectors / np.maximum(norms, 1e-12)
        return out

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of each pair a[i], b[i]; 0.0 for a pair with an empty (or blank) side."""

        return pair_similarity(self.encode, a, b)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    settings = get_settings()
    encoder = SentenceEncoder(resolve_model(settings.models.embedding, settings.models.cache_dir))
    print(f"{encoder.similarity(argv[:1], argv[1:])[0]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def torch_embeddings_available() -> bool:
    """Whether sentence-transformers and torch are installed here (Airflow workers on MWAA have
    neither). They are looked up, not imported: choosing costs nothing when nothing gets embedded."""
    from importlib.util import find_spec

    try:
        return all(find_spec(name) is not None for name in ("torch", "sentence_transformers"))
    except ValueError:  # a module set to None in sys.modules, as tests do to hide it
        return False


def make_sentence_encoder(settings: Settings):
    """The sentence encoder of ``models.embedding`` in the runtime ``models.embedding_runtime`` picks:
    ``training.metrics.Embedder`` (torch) or ``llmops.encoder.SentenceEncoder`` (numpy). Both have
    ``encode`` and ``similarity`` and give the same vectors within float32 rounding
    (``tests/unit/test_encoder.py``), so baselines stay keyed by the encoder's name alone
    (``baseline_uri``): one built by either runtime serves windows embedded by the other."""

    runtime = settings.models.embedding_runtime
    if runtime == "auto":
        runtime = "torch" if torch_embeddings_available() else "numpy"
    elif runtime == "torch" and not torch_embeddings_available():
        raise ConfigError(
            "models.embedding_runtime is 'torch' but sentence-transformers or torch does not import here;"
            " set it to 'numpy' or 'auto'"
        )
    folder = resolve_model(settings.models.embedding, settings.models.cache_dir)
    if runtime == "numpy":
        from llmops.encoder import SentenceEncoder

        return SentenceEncoder(folder)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the encoder's "Loading weights" bar is noise in task logs
    return Embedder(folder)
