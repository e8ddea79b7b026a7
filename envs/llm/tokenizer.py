"""Tokenizers for the LLM plug-in, built with the ``tokenizers`` package.

* :func:`from_gguf` -- a byte-level BPE from a GGUF file's vocabulary (``tokenizer.ggml.tokens``), merges
  (``tokenizer.ggml.merges``) and token types (control tokens become special tokens). The pre-tokenizer follows
  ``tokenizer.ggml.pre``: SmolLM/StarCoder-style vocabularies split digits one by one before the GPT-2 split;
  Llama-3 and Qwen2 use their own split pattern; others fall back to GPT-2's.
* :func:`from_hf` -- a Hugging Face folder's ``tokenizer.json``.

Both return a :class:`Tokenizer`: ``encode``/``decode`` and :meth:`Tokenizer.batch` for left-padded prompt arrays.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# Pre-tokenizer split patterns (the public regexes of the GPT-2 and Llama-3 tokenizers).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A wrapped ``tokenizers.Tokenizer`` with the ids the generator needs.

    Attributes:
      backend: the ``tokenizers.Tokenizer``.
      eos_id: end-of-sequence id.
      pad_id: padding id (``eos_id`` when the vocabulary has none).
      stop_ids: ids that end generation (EOS, ``<|im_end|>``, ``<|endoftext|>`` when present).
    """

    backend: Any
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings such as ``<|im_start|>`` map to their ids)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def batch(self, texts: Sequence[str], *, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids ``int32[B, P]`` and mask ``bool[B, P]`` (``P = length`` or the longest prompt).

        Raises:
          ValueError: a prompt longer than ``length``.
        """
        ids = [self.encode(t) for t in texts]
        longest = max(len(i) for i in ids)
        length = longest if length is None else length
        if longest > length:
            raise ValueError(f"a prompt has {longest} tokens, more than length={length}")
        out = np.full((len(ids), length), self.pad_id, np.int32)
        mask = np.zeros((len(ids), length), bool)
        for r, row in enumerate(ids):
            if row:
                out[r, length - len(row):] = row
                mask[r, length - len(row):] = True
        return out, mask

    def stop_sequences(self, stops: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """Token-id sequences of stop strings (their plain tokenisation), for ``GenerateOptions``."""
        return tuple(tuple(self.encode(s)) for s in stops if s)


def _finish(backend, eos_id: int | None, pad_id: int | None) -> Tokenizer:
    stops = []
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        i = backend.token_to_id(name)
        if i is not None:
            stops.append(i)
    if eos_id is None:
        eos_id = stops[0] if stops else 0
    if eos_id not in stops:
        stops.insert(0, eos_id)
    return Tokenizer(backend, int(eos_id), int(eos_id if pad_id is None else pad_id), tuple(stops))


def from_gguf(path: str | pathlib.Path) -> Tokenizer:
    """Builds the tokenizer stored in a GGUF file (BPE vocabularies, ``tokenizer.ggml.model == "gpt2"``).

    Raises:
      ValueError: a SentencePiece (``llama``) or other non-BPE vocabulary, or a file without a vocabulary.
    """
    try:
        import gguf  # noqa: F401
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("building a GGUF tokenizer needs: pip install gguf tokenizers") from e
    from esx_envs.llm.loader import _gguf_reader

    _, reader = _gguf_reader(path)
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{path}: GGUF file has no tokenizer vocabulary")
    kind = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else None
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                         "use the Hugging Face tokenizer.json of the model instead")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"

    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre in _DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        pattern = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre, _GPT2_SPLIT)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if int(t) in (3, 4)]  # CONTROL, USER_DEFINED
    backend.add_special_tokens(control)

    def field_int(name):
        return int(fields[name].contents()) if name in fields else None

    return _finish(backend, field_int("tokenizer.ggml.eos_token_id"), field_int("tokenizer.ggml.padding_token_id"))


def from_hf(folder: str | pathlib.Path) -> Tokenizer:
    """Loads ``tokenizer.json`` from a Hugging Face folder (EOS/pad ids from ``config.json`` when present)."""
    import json

    from tokenizers import Tokenizer as HFTokenizer

    folder = pathlib.Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder}: no tokenizer.json")
    backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    eos = pad = None
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        pad = config.get("pad_token_id")
    return _finish(backend, eos, pad)


def load(path: str | pathlib.Path) -> Tokenizer:
    """The tokenizer of a ``.gguf`` file or a Hugging Face folder."""
    path = pathlib.Path(path)
    return from_hf(path) if path.is_dir() else from_gguf(path)


class ByteTokenizer:
    """A dependency-free byte-level tokenizer for tiny test models: ids ``0..255`` are UTF-8 bytes, then
    ``<|endoftext|>`` (256, EOS and padding), ``<|im_start|>`` (257), ``<|im_end|>`` (258). ``vocab_size = 259``.
    Same interface as :class:`Tokenizer`."""

    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    vocab_size = 259
    eos_id = pad_id = 256
    stop_ids = (256, 258)

    def encode(self, text: str) -> list[int]:
        import re

        out: list[int] = []
        for piece in re.split("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")", text):
            if piece in self.SPECIALS:
                out.append(256 + self.SPECIALS.index(piece))
            elif piece:
                out.extend(piece.encode("utf-8"))
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        text, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            text.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens and i - 256 < len(self.SPECIALS):
                text.append(self.SPECIALS[i - 256])
        text.append(buf.decode("utf-8", errors="replace"))
        return "".join(text)

    def token_id(self, token: str) -> int | None:
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None

    batch = Tokenizer.batch
    stop_sequences = Tokenizer.stop_sequences
