"""Loads Llama-family checkpoints into the parameter layout of :mod:`esx_envs.llm.model`.

* :func:`load_gguf` -- a GGUF file (llama.cpp format), every tensor dequantised to float with the ``gguf`` package.
  The GGUF converter permutes the rows of the query and key projections of ``llama``-architecture models for
  llama.cpp's interleaved rotary embedding; the loader undoes it (Qwen2 GGUFs are not permuted).
* :func:`load_hf` -- a Hugging Face folder with ``config.json`` and ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``), model types ``llama``, ``mistral`` and ``qwen2``.
* :func:`load` -- either, by path.

Unknown files, architectures or mismatched tensor shapes raise ``ValueError`` naming the problem.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from esx_envs.llm.model import LlamaConfig, check_params

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "mistral")
SUPPORTED_HF_TYPES = ("llama", "mistral", "qwen2")


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of the GGUF converter's rotary permutation of a ``[heads · d, in]`` projection (per head, the row
    order ``(d/2, 2)`` goes back to ``(2, d/2)``)."""
    out_dim, in_dim = w.shape
    d = out_dim // n_heads
    return w.reshape(n_heads, d // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _stack(rows: list[np.ndarray], dtype) -> jnp.ndarray:
    return jnp.asarray(np.stack(rows), dtype)


def _assemble(cfg: LlamaConfig, get, dtype) -> dict:
    """Builds the params dict from ``get(kind, layer) -> np.ndarray`` in PyTorch layout (``[out, in]``)."""
    L = cfg.num_layers
    layers = {
        "attn_norm": _stack([get("attn_norm", i) for i in range(L)], dtype),
        "mlp_norm": _stack([get("mlp_norm", i) for i in range(L)], dtype),
    }
    for ours in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        layers[ours] = _stack([get(ours, i).T for i in range(L)], dtype)
    if cfg.qkv_bias:
        for ours in ("bq", "bk", "bv"):
            layers[ours] = _stack([get(ours, i) for i in range(L)], dtype)
    params = {"embed": jnp.asarray(get("embed", None), dtype), "layers": layers,
              "norm": jnp.asarray(get("norm", None), dtype)}
    if not cfg.tie_embeddings:
        params["lm_head"] = jnp.asarray(get("lm_head", None), dtype)
    check_params(params, cfg)
    return params


# ----------------------------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "attn_norm": "blk.{i}.attn_norm.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
    "wq": "blk.{i}.attn_q.weight", "wk": "blk.{i}.attn_k.weight", "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight", "w_gate": "blk.{i}.ffn_gate.weight", "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight", "bq": "blk.{i}.attn_q.bias", "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias", "embed": "token_embd.weight", "norm": "output_norm.weight",
    "lm_head": "output.weight",
}


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Scalar and string metadata of a ``gguf.GGUFReader`` (arrays of tokens/merges are left out)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.split(".")[-1] in ("tokens", "merges", "token_type",
                                                                           "scores"):
            continue
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed
            continue
    return out


def _gguf_reader(path):
    try:
        import gguf
    except ImportError as e:  # pragma: no cover
        raise ImportError("loading GGUF files needs the 'gguf' package: pip install gguf") from e
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic bytes)")
    return gguf, gguf.GGUFReader(str(path))


def gguf_config(meta: dict[str, Any], tensor_names: set[str]) -> LlamaConfig:
    """The :class:`LlamaConfig` described by GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_GGUF_ARCHS})")

    def need(key):
        full = f"{arch}.{key}"
        if full not in meta:
            raise ValueError(f"GGUF metadata lacks {full!r}")
        return meta[full]

    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count",
                                                                        dim // n_heads)))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        raise ValueError("GGUF metadata lacks the vocabulary size")
    return LlamaConfig(
        vocab_size=int(vocab), dim=dim, num_layers=int(need("block_count")), num_heads=n_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
        hidden_dim=int(need("feed_forward_length")), head_dim=head_dim,
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
    )


def load_gguf(path: str | pathlib.Path, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict, dict[str, Any]]:
    """Reads a GGUF checkpoint, dequantising every tensor (any quantisation the ``gguf`` package knows).

    Args:
      path: the ``.gguf`` file.
      dtype: parameter dtype after dequantisation (``float32``, or ``bfloat16`` to halve memory).

    Returns:
      ``(cfg, params, metadata)``.
    """
    gguf, reader = _gguf_reader(path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = gguf_config(meta, set(tensors))
    vocab_rows = tensors["token_embd.weight"].shape[-1] if "token_embd.weight" in tensors else None
    if vocab_rows is not None and int(vocab_rows) != cfg.vocab_size:
        cfg = LlamaConfig(**{**cfg.__dict__, "vocab_size": int(vocab_rows)})
    permute = meta.get("general.architecture") in ("llama", "mistral")

    def get(kind, i):
        name = _GGUF_NAMES[kind].format(i=i)
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} missing")
        t = tensors[name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = w.reshape(shape)
        if permute and kind == "wq":
            w = _unpermute_qk(w, cfg.num_heads)
        elif permute and kind == "wk":
            w = _unpermute_qk(w, cfg.num_kv_heads)
        elif permute and kind == "bq":
            w = _unpermute_qk(w[:, None], cfg.num_heads)[:, 0]
        elif permute and kind == "bk":
            w = _unpermute_qk(w[:, None], cfg.num_kv_heads)[:, 0]
        return w

    return cfg, _assemble(cfg, get, dtype), meta


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face safetensors
# ----------------------------------------------------------------------------------------------------------------
_HF_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight", "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight", "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias", "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
    "w_gate": "model.layers.{i}.mlp.gate_proj.weight", "w_up": "model.layers.{i}.mlp.up_proj.weight",
    "w_down": "model.layers.{i}.mlp.down_proj.weight",
    "embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight",
}


def hf_config(config: dict[str, Any]) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face ``config.json`` dict."""
    mtype = config.get("model_type")
    if mtype not in SUPPORTED_HF_TYPES:
        raise ValueError(f"model_type {mtype!r} is not supported (supported: {SUPPORTED_HF_TYPES})")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ValueError(f"rope scaling {rope_type!r} is not supported")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={config['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    bias = bool(config.get("attention_bias", mtype == "qwen2"))
    n_heads = int(config["num_attention_heads"])
    return LlamaConfig(
        vocab_size=int(config["vocab_size"]), dim=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]), num_heads=n_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or n_heads),
        hidden_dim=int(config["intermediate_size"]),
        head_dim=config.get("head_dim") or int(config["hidden_size"]) // n_heads,
        rope_theta=float(theta), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), qkv_bias=bias,
    )


def load_hf(folder: str | pathlib.Path, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """Reads a Hugging Face checkpoint folder (``config.json`` + safetensors).

    Returns:
      ``(cfg, params)``.
    """
    try:
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover
        raise ImportError("loading safetensors needs the 'safetensors' package: pip install safetensors") from e
    folder = pathlib.Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json")
    cfg = hf_config(json.loads((folder / "config.json").read_text()))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through jax
            from safetensors.flax import load_file as load_flax
            tensors.update({k: np.asarray(v, np.float32) for k, v in load_flax(str(folder / name)).items()})

    def get(kind, i):
        name = _HF_NAMES[kind].format(i=i)
        if name not in tensors:
            raise ValueError(f"{folder}: tensor {name!r} missing")
        return np.asarray(tensors[name], np.float32)

    return cfg, _assemble(cfg, get, dtype)


def load(path: str | pathlib.Path, *, dtype=jnp.float32) -> tuple[LlamaConfig, dict]:
    """Loads a ``.gguf`` file or a Hugging Face folder. Returns ``(cfg, params)``."""
    path = pathlib.Path(path)
    if path.is_dir():
        return load_hf(path, dtype=dtype)
    if path.suffix == ".gguf" or path.is_file():
        cfg, params, _ = load_gguf(path, dtype=dtype)
        return cfg, params
    raise ValueError(f"{path}: not a .gguf file or a Hugging Face folder")
