"""Byte-level text data: files, folders, Hugging Face datasets; train/validation split; truncated-ES streams.

* :func:`load_bytes` reads a file (one document) or a folder (every file below it, sorted, one document each) and
  returns the bytes and a document-start mask. The default is the shipped copy of tinyshakespeare
  (``envs/data/tinyshakespeare.txt``, sha256 :data:`SHAKESPEARE_SHA256`), so a fresh clone works offline.
* :func:`load_hf_dataset` joins the text field of a Hugging Face dataset (e.g. ``JeanKaddour/minipile``); the
  ``datasets`` package is imported only there (not needed, and not run, in CI).
* :func:`split` takes the first 90% as training and the last 10% as validation.
* :class:`Streams` gives ``S`` parallel byte streams over the (circular) training data. The window of generation
  ``g`` is a pure function of ``g`` (no hidden host state), so resuming a run reproduces it exactly; the hidden
  state of the model must be reset where ``resets`` is true (a document starts, or the data wraps around).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_bytes(path: str | os.PathLike | None = None, *, suffixes: tuple[str, ...] | None = None,
               max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reads a text file or a folder of text files as bytes.

    Args:
      path: a file, a folder (read recursively, files sorted by path, each one document), or ``None`` for the shipped
        tinyshakespeare copy.
      suffixes: with a folder, only files ending in one of these (e.g. ``(".txt", ".md")``); ``None``: all files.
      max_bytes: stop after this many bytes.

    Returns:
      ``(data uint8[n], doc_starts bool[n])``; ``doc_starts[i]`` is true where a document begins.
    """
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.exists():
        raise FileNotFoundError(f"load_bytes: {path} does not exist")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and (suffixes is None or p.suffix in suffixes))
    if not files:
        raise ValueError(f"load_bytes: no files under {path}")
    # Each file is one document; files are read lazily, so max_bytes stops reading early.
    return documents_to_bytes((f.read_bytes() for f in files), max_bytes=max_bytes)


def documents_to_bytes(texts, *, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Joins an iterable of ``str`` / ``bytes`` documents into ``(data uint8[n], doc_starts bool[n])``."""
    chunks, starts, total = [], [], 0
    for t in texts:
        b = t.encode("utf-8") if isinstance(t, str) else bytes(t)
        if max_bytes is not None:
            b = b[:max_bytes - total]
        if not b:
            continue
        chunks.append(np.frombuffer(b, np.uint8))
        starts.append(total)
        total += len(b)
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks:
        raise ValueError("documents_to_bytes: no non-empty documents")
    data = np.concatenate(chunks)
    doc_starts = np.zeros(len(data), bool)
    doc_starts[starts] = True
    return data, doc_starts


def load_hf_dataset(name: str = "JeanKaddour/minipile", *, split: str = "train", text_field: str = "text",
                    max_bytes: int | None = 100_000_000, streaming: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Loads a Hugging Face text dataset (default minipile) as bytes, one document per row.

    Needs ``pip install datasets`` and network access (or a local cache); not used by the tests.
    Returns ``(data uint8[n], doc_starts bool[n])`` as :func:`load_bytes`.
    """
    try:
        import datasets  # noqa: PLC0415 (optional dependency)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_hf_dataset needs the `datasets` package: pip install datasets") from err
    ds = datasets.load_dataset(name, split=split, streaming=streaming)
    return documents_to_bytes((row[text_field] for row in ds), max_bytes=max_bytes)


@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray
    train_starts: np.ndarray
    valid: np.ndarray
    valid_starts: np.ndarray


def split(data: np.ndarray, doc_starts: np.ndarray, *, valid_fraction: float = 0.1) -> Split:
    """First ``1 - valid_fraction`` of the bytes for training, the rest for validation."""
    cut = int(round(len(data) * (1.0 - valid_fraction)))
    vs = doc_starts[cut:].copy()
    vs[0] = True
    return Split(data[:cut], doc_starts[:cut], data[cut:], vs)


def load_split(path: str | os.PathLike | None = None, *, valid_fraction: float = 0.1) -> Split:
    """:func:`load_bytes` then :func:`split` (default: tinyshakespeare, 90% / 10%)."""
    return split(*load_bytes(path), valid_fraction=valid_fraction)


class Streams:
    """``num_streams`` byte streams over circular training data for truncated ES.

    Stream ``k`` starts at offset ``k · n / num_streams + jitter_k`` (jitter from ``seed``) and advances ``length``
    bytes per generation. :meth:`batch` of generation ``g`` returns ``tokens: int32[S, length + 1]`` (inputs and
    next-byte targets) and ``resets: bool[S, length]`` (true at the first byte of a document and where the data wraps
    around). Pure in ``g``.
    """

    def __init__(self, data: np.ndarray, doc_starts: np.ndarray, *, num_streams: int, length: int, seed: int = 0):
        if len(data) < length + 2:
            raise ValueError(f"Streams: {len(data)} bytes is too short for length={length}")
        self.data = np.asarray(data, np.uint8)
        self.starts = np.asarray(doc_starts, bool).copy()
        self.starts[0] = True  # the wrap-around point
        self.num_streams, self.length = int(num_streams), int(length)
        n = len(self.data)
        rng = np.random.default_rng(seed)
        spacing = n // self.num_streams
        self.offsets = (np.arange(self.num_streams, dtype=np.int64) * spacing
                        + rng.integers(0, max(spacing, 1), self.num_streams))

    def batch(self, generation: int) -> tuple[np.ndarray, np.ndarray]:
        n, t = len(self.data), self.length
        start = (self.offsets + np.int64(generation) * t) % n
        idx = (start[:, None] + np.arange(t + 1)[None, :]) % n
        tokens = self.data[idx].astype(np.int32)
        resets = self.starts[idx[:, :t]]
        if generation == 0:
            resets = resets.copy()
            resets[:, 0] = True
        return tokens, resets
