"""A pure-JAX Llama-family decoder (Llama, SmolLM2, Mistral-style; Qwen2 with q/k/v biases) and batched generation.

Every matrix product and the embedding lookup go through :func:`esx.dense` / :func:`esx.embed` (norm scales and
biases through :func:`esx.value`), so the same code runs on plain parameters and on an EGGROLL member view whose
matrices carry a rank-``r`` perturbation that is never materialised. Layers are stacked along a leading axis and
run with ``lax.scan`` (compile time does not grow with depth; EGGROLL gives each layer its own noise).

Parameters (a plain dict; ``L`` layers, ``D`` model width, ``H``/``K`` query/key-value heads of width ``d``,
``F`` MLP width, ``V`` vocabulary)::

    embed             float[V, D]        (tied output head unless "lm_head" is present)
    layers/attn_norm  float[L, D]        layers/mlp_norm float[L, D]
    layers/wq         float[L, D, H d]   layers/wk, wv  float[L, D, K d]    layers/wo float[L, H d, D]
    layers/bq, bk, bv float[L, H d] / float[L, K d]   (only with qkv_bias, as in Qwen2)
    layers/w_gate, w_up float[L, D, F]   layers/w_down  float[L, F, D]
    norm              float[D]
    lm_head           float[V, D]        (only when not tied)

Matrices are stored ``in_out`` (``x @ W``) except the vocabulary-sized ones, which are ``[V, D]`` (used ``out_in``
by the output head). :func:`labels` gives the esx label overrides (norm scales and biases are ``"full"``).

Attention is grouped-query (``H`` a multiple of ``K``), rotary embeddings use the Hugging Face "rotate half"
convention (the GGUF loader undoes llama.cpp's row permutation), and the MLP is SwiGLU.

Generation (:func:`generate`) takes left-padded prompts, pre-fills a KV cache ``float[L, B, P + T, K, d]`` (keys
and values), then decodes ``T = max_new_tokens`` tokens one at a time in a ``lax.while_loop`` that stops early when
every row has hit a stop token or a stop sequence. Everything is jittable and ``vmap``-able over population
members. Memory per sequence: ``2 · L · (P + T) · K · d`` cache entries plus ``O(D + F + V)`` activations per step;
the parameters are shared by the whole population.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

import esx

Params = dict


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static architecture of a Llama-family decoder (hashable: a jit static argument).

    Attributes:
      vocab_size: ``V``.
      dim: ``D``, the residual width.
      num_layers: ``L``.
      num_heads: ``H``, query heads.
      num_kv_heads: ``K``, key/value heads (``H % K == 0``; ``K < H`` is grouped-query attention).
      hidden_dim: ``F``, the SwiGLU width.
      head_dim: ``d``; defaults to ``D // H``.
      rope_theta: rotary base frequency.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: output head is the embedding table (``embed`` used ``out_in``).
      qkv_bias: q/k/v projections have biases (Qwen2).
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_dim: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "hidden_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LlamaConfig: {name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"LlamaConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                                 "give head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even (rotary pairs)")

    def num_params(self) -> int:
        """Total number of parameters."""
        d, h, k, hd, f, v = self.dim, self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_dim, \
            self.vocab_size
        per_layer = 2 * d + d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f
        if self.qkv_bias:
            per_layer += h * hd + 2 * k * hd
        return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + d


def init_params(key: jax.Array, cfg: LlamaConfig, *, scale: float = 0.02, dtype=jnp.float32) -> Params:
    """Random parameters (normal with std ``scale``; norm scales 1, biases 0) for tests and notebooks."""
    L, D, H, K, d, F, V = (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.hidden_dim, cfg.vocab_size)
    shapes = {"wq": (L, D, H * d), "wk": (L, D, K * d), "wv": (L, D, K * d), "wo": (L, H * d, D),
              "w_gate": (L, D, F), "w_up": (L, D, F), "w_down": (L, F, D)}
    keys = jax.random.split(key, len(shapes) + 5)
    layers = {n: scale * jax.random.normal(k, s, dtype) for (n, s), k in zip(shapes.items(), keys)}
    layers["attn_norm"] = jnp.ones((L, D), dtype)
    layers["mlp_norm"] = jnp.ones((L, D), dtype)
    if cfg.qkv_bias:
        layers["bq"] = scale * jax.random.normal(keys[-5], (L, H * d), dtype)
        layers["bk"] = scale * jax.random.normal(keys[-4], (L, K * d), dtype)
        layers["bv"] = scale * jax.random.normal(keys[-3], (L, K * d), dtype)
    params = {"embed": scale * jax.random.normal(keys[-2], (V, D), dtype), "layers": layers,
              "norm": jnp.ones((D,), dtype)}
    if not cfg.tie_embeddings:
        params["lm_head"] = scale * jax.random.normal(keys[-1], (V, D), dtype)
    return params


def labels(cfg: LlamaConfig, *, freeze_embeddings: bool = False) -> dict[str, str]:
    """esx label overrides for these parameters: stacked norm scales and biases are ``"full"`` (the default
    labeller would call the 2-D ``[L, D]`` stacks matrices); optionally freeze the vocabulary-sized tables."""
    out = {"layers/attn_norm": esx.FULL, "layers/mlp_norm": esx.FULL}
    if cfg.qkv_bias:
        out.update({"layers/bq": esx.FULL, "layers/bk": esx.FULL, "layers/bv": esx.FULL})
    if freeze_embeddings:
        out["embed"] = esx.FROZEN
        if not cfg.tie_embeddings:
            out["lm_head"] = esx.FROZEN
    return out


def cast_params(params: Any, dtype) -> Any:
    """``params`` (plain arrays or an EGGROLL member view) with every floating array in ``dtype``: the compute copy
    of float32 master weights. A :class:`esx.LowRank` leaf casts ``base``, ``a`` and ``b``, an :class:`esx.Full`
    leaf ``base`` and ``eps``; the coefficients ``σ s`` stay float32, as in a view of parameters stored in
    ``dtype``."""
    def cast(x):
        if isinstance(x, esx.LowRank):
            return esx.LowRank(x.base.astype(dtype), x.a.astype(dtype), x.b.astype(dtype), x.coef)
        if isinstance(x, esx.Full):
            return esx.Full(x.base.astype(dtype), x.eps.astype(dtype), x.coef)
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, params, is_leaf=lambda x: isinstance(x, (esx.LowRank, esx.Full)))


def check_params(params: Params, cfg: LlamaConfig) -> None:
    """Raises ``ValueError`` naming the first parameter whose presence or shape does not match ``cfg``."""
    ref = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    ref_flat = {esx.labels.path_to_str(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(ref)[0]}
    got_flat = {esx.labels.path_to_str(p): tuple(v.shape)
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in sorted(set(ref_flat) | set(got_flat)):
        if name not in got_flat:
            raise ValueError(f"parameters lack {name!r} (expected shape {ref_flat[name]}) for {cfg}")
        if name not in ref_flat:
            raise ValueError(f"unexpected parameter {name!r} for {cfg}")
        if tuple(ref_flat[name]) != got_flat[name]:
            raise ValueError(f"parameter {name!r} has shape {got_flat[name]}, the config needs {ref_flat[name]}")


# ----------------------------------------------------------------------------------------------------------------
# The forward pass
# ----------------------------------------------------------------------------------------------------------------
def _rms_norm(x: jax.Array, scale, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * esx.value(scale).astype(jnp.float32)).astype(x.dtype)


def _rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, "rotate half" convention. ``x: float[B, T, heads, d]``, ``positions: int[B, T]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _layer(cfg: LlamaConfig, p: dict, x: jax.Array, positions: jax.Array, k_cache: jax.Array,
           v_cache: jax.Array, start: jax.Array, key_mask: jax.Array):
    """One decoder layer on ``x: float[B, T, D]`` writing keys/values at cache rows ``start … start + T - 1``.

    ``k_cache, v_cache: float[B, S, K, d]``; ``key_mask: bool[B, T, S]`` (which cache rows each query may see).
    Returns ``(x, k_cache, v_cache)``.
    """
    B, T, _ = x.shape
    H, K, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = _rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = esx.dense(h, p["wq"])
    k = esx.dense(h, p["wk"])
    v = esx.dense(h, p["wv"])
    if cfg.qkv_bias:
        q = q + esx.value(p["bq"]).astype(q.dtype)
        k = k + esx.value(p["bk"]).astype(k.dtype)
        v = v + esx.value(p["bv"]).astype(v.dtype)
    q = _rope(q.reshape(B, T, H, d), positions, cfg.rope_theta)
    k = _rope(k.reshape(B, T, K, d), positions, cfg.rope_theta)
    v = v.reshape(B, T, K, d)
    k_cache = lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
    v_cache = lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
    qg = q.reshape(B, T, K, H // K, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(q.dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(d)
    scores = jnp.where(key_mask[:, None, None, :, :], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    att = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache).reshape(B, T, H * d).astype(x.dtype)
    x = x + esx.dense(att, p["wo"])
    h = _rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    mlp = jax.nn.silu(esx.dense(h, p["w_gate"])) * esx.dense(h, p["w_up"])
    return x + esx.dense(mlp, p["w_down"]), k_cache, v_cache


def _scannable(layers: dict) -> dict:
    """Gives full-rank perturbed leaves a per-layer ``coef`` so ``lax.scan`` can slice them (esx's ``Full.coef`` is
    a scalar shared by the stack; ``LowRank.coef`` already has the stack shape)."""
    def fix(leaf):
        if isinstance(leaf, esx.Full) and jnp.ndim(leaf.coef) == 0:
            return esx.Full(leaf.base, leaf.eps, jnp.broadcast_to(leaf.coef, leaf.base.shape[:1]))
        return leaf
    return jax.tree_util.tree_map(fix, layers, is_leaf=lambda v: isinstance(v, (esx.Full, esx.LowRank)))


def _run_layers(params: Params, cfg: LlamaConfig, x, positions, cache, start, key_mask):
    def body(h, xs):
        p, kc, vc = xs
        h, kc, vc = _layer(cfg, p, h, positions, kc, vc, start, key_mask)
        return h, (kc, vc)

    x, (k_cache, v_cache) = lax.scan(body, x, (_scannable(params["layers"]), cache[0], cache[1]))
    return x, (k_cache, v_cache)


def _head(params: Params, cfg: LlamaConfig, x: jax.Array) -> jax.Array:
    x = _rms_norm(x, params["norm"], cfg.norm_eps)
    table = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return esx.dense(x, table, layout="out_in").astype(jnp.float32)


def _dtype(params: Params):
    e = params["embed"]
    return (e.base if isinstance(e, (esx.LowRank, esx.Full)) else e).dtype


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """An empty KV cache: keys and values ``float[L, batch, length, K, d]``."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def forward(params: Params, tokens: jax.Array, *, cfg: LlamaConfig, mask: jax.Array | None = None) -> jax.Array:
    """Logits of every position (no cache kept): the training / scoring forward.

    Args:
      params: parameters (or an esx member view of them).
      tokens: ``int[B, T]``.
      cfg: the architecture.
      mask: ``bool[B, T]``, ``True`` on real tokens (padding on the left and/or right; rotary positions count
        real tokens only, padded keys are never attended to); ``None`` means no padding.

    Returns:
      ``float32[B, T, V]`` (rows at padded positions are meaningless).
    """
    B, T = tokens.shape
    if mask is None:
        mask = jnp.ones((B, T), bool)
    mask = mask.astype(bool)
    idx = jnp.arange(T, dtype=jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    key_mask = (idx[None, None, :] <= idx[None, :, None]) & mask[:, None, :]
    x = esx.embed(tokens, params["embed"]).astype(_dtype(params))
    cache = init_cache(cfg, B, T, x.dtype)
    x, _ = _run_layers(params, cfg, x, positions, cache, jnp.zeros((), jnp.int32), key_mask)
    return _head(params, cfg, x)


def token_logprobs(params: Params, tokens: jax.Array, *, cfg: LlamaConfig, mask: jax.Array | None = None):
    """``log p(tokens[:, t] | tokens[:, :t])`` for ``t >= 1``: ``float32[B, T - 1]`` (``mask`` as in
    :func:`forward`)."""
    logits = forward(params, tokens, cfg=cfg, mask=mask)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Static generation options (hashable).

    Attributes:
      max_new_tokens: ``T``, tokens generated per prompt.
      stop_ids: token ids that end a sequence (kept in the output, e.g. ``<|im_end|>``, EOS).
      stop_sequences: token-id sequences that end a sequence once generated (the tokenisations of stop strings;
        the host should still cut decoded text at the stop string, since a model may spell it with other tokens).
      pad_id: id written after a sequence has ended.
    """

    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("stop_sequences: empty sequence")


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.maximum(temperature, 1e-6)
    sampled = jax.random.categorical(key, logits / t, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def generate(params: Params, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array, *, cfg: LlamaConfig,
             options: GenerateOptions, temperature: jax.Array | float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Generates ``options.max_new_tokens`` tokens after each (left-padded) prompt, with a KV cache.

    Args:
      params: parameters or an esx member view (``vmap`` this function over members).
      prompt: ``int[B, P]`` prompts, padded on the left.
      prompt_mask: ``bool[B, P]``, ``True`` on real prompt tokens (every row needs its last entry real).
      key: sampling key (unused when ``temperature == 0``).
      cfg: the architecture (static).
      options: :class:`GenerateOptions` (static).
      temperature: ``float[]``; ``0`` is greedy decoding (may be traced).

    Returns:
      ``(tokens int32[B, T], lengths int32[B])``: generated ids (``pad_id`` after the end) and how many are real
      (including the stop token).
    """
    B, P = prompt.shape
    T = options.max_new_tokens
    S = P + T
    dtype = _dtype(params)
    temperature = jnp.asarray(temperature, jnp.float32)
    pad = P - jnp.sum(prompt_mask, axis=1).astype(jnp.int32)
    idx = jnp.arange(S, dtype=jnp.int32)
    cache = init_cache(cfg, B, S, dtype)

    # Pre-fill the prompt; only the last position goes through the output head.
    q_idx = jnp.arange(P, dtype=jnp.int32)
    positions = jnp.maximum(q_idx[None, :] - pad[:, None], 0)
    key_mask = (idx[None, None, :] <= q_idx[None, :, None]) & (idx[None, None, :] >= pad[:, None, None])
    x = esx.embed(prompt, params["embed"]).astype(dtype)
    x, cache = _run_layers(params, cfg, x, positions, cache, jnp.zeros((), jnp.int32), key_mask)
    logits = _head(params, cfg, x[:, -1])
    first = _sample(logits, jax.random.fold_in(key, 0), temperature)

    stop_ids = jnp.asarray(options.stop_ids or (-1,), jnp.int32)
    seqs = options.stop_sequences
    window = max([len(s) for s in seqs] + [1])

    def is_stop(tok, tail):
        hit = jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
        for s in seqs:
            hit = hit | jnp.all(tail[:, window - len(s):] == jnp.asarray(s, jnp.int32)[None, :], axis=1)
        return hit

    out = jnp.full((B, T), options.pad_id, jnp.int32).at[:, 0].set(first)
    tail = jnp.concatenate([jnp.full((B, window - 1), -1, jnp.int32), first[:, None]], axis=1)
    done = is_stop(first, tail)
    lengths = jnp.ones((B,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < T) & ~jnp.all(done)

    def body(carry):
        i, out, cache, tok, done, tail, lengths = carry
        pos = P + i - 1  # cache row (and absolute index) of the token being fed
        positions = (pos - pad)[:, None]
        key_mask = (idx[None, None, :] <= pos) & (idx[None, None, :] >= pad[:, None, None])
        x = esx.embed(tok[:, None], params["embed"]).astype(dtype)
        x, cache = _run_layers(params, cfg, x, positions, cache, pos, key_mask)
        logits = _head(params, cfg, x[:, 0])
        nxt = _sample(logits, jax.random.fold_in(key, i), temperature)
        nxt = jnp.where(done, options.pad_id, nxt)
        tail = jnp.concatenate([tail[:, 1:], nxt[:, None]], axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(nxt, tail)
        out = lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, out, cache, nxt, done, tail, lengths

    carry = (jnp.ones((), jnp.int32), out, cache, first, done, tail, lengths)
    _, out, _, _, _, _, lengths = lax.while_loop(cond, body, carry)
    return out, lengths


@functools.partial(jax.jit, static_argnames=("cfg", "options"))
def generate_jit(params: Params, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array, *, cfg: LlamaConfig,
                 options: GenerateOptions, temperature: Any = 0.0):
    """:func:`generate` under ``jit`` (``cfg`` and ``options`` static)."""
    return generate(params, prompt, prompt_mask, key, cfg=cfg, options=options, temperature=temperature)
