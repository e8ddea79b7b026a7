"""EGG: the integer-only recurrent byte-level language model of PAPER.md §6.

Everything in :func:`forward`, :func:`log2_likelihood` and :func:`fitness` is integer arithmetic: ``int8``
parameters and activations, ``int8 × int8`` matmuls with ``int32`` accumulation, shifts, saturating casts and
table lookups. No floating-point value or operation appears in their jaxprs (``tests/test_egg.py`` walks them).

Fixed point: an ``int8`` activation or weight ``q`` stands for ``q / 16`` (4 fractional bits, range ±7.94).

* **Matmul.** ``x @ W`` accumulates ``int32`` in units of 16·16 and is rescaled by ``16 · √fan_in``, a right shift by
  ``4 + log2(fan_in) / 2`` (fan-ins are powers of 4), then saturated to ``int8`` where the result is stored.
* **LayerNorm** divides by the mean absolute value: ``y = sat(16 x / m)`` with ``m = Σ|x| / D`` computed as
  ``(x · RECIP[Σ|x| >> (log2 D - 2)]) >> 16`` (``RECIP`` is an ``int32[509]`` reciprocal table), then a gain
  ``sat(y g >> 4)``.
* **Layer** (pre-norm): ``y = sat(y + GRU(LN₁(y), s))``, ``y = sat(y + MLP(LN₂(y)))``; the MLP is
  ``sat(W_down sat(W_up v))`` (``D → 4D → D``, no activation).
* **minGRU-like cell** (sigmoid / tanh replaced by identity)::

      f = sat(W_f u + U_f s + b_f)          ĝ = ((f + 127) ⊙ s) >> 8
      ĥ = sat(W_h u + U_h ĝ + b_h)          h = s + (((f + 127) ⊙ (ĥ − s)) >> 8)

  The hidden state ``s: int8[L, D]`` is reset to 0 at the first byte of every document.
* **Head**: ``logits = sat(LN_out(y) @ W_head + b_head)``: ``int8[256]``, read as **base-2** log-odds: logit ``q`` is
  ``q / 16`` bits, i.e. ``p(b) ∝ 2^(q_b / 16)``.
* **Log-likelihood** in fixed point with 12 fractional bits (4096 = 1 bit): with ``M = max q``,
  ``S = Σ_b EXP2[M - q_b]`` where ``EXP2[d] = round(2^20 · 2^(-d/16))`` (``int32[255]``), and
  ``log2 S = (e - 20) · 4096 + LOG2[(S >> (e - 12)) - 4096]`` with ``e`` the index of the top set bit of ``S``
  (``lax.clz``) and ``LOG2[i] = round(4096 · log2(1 + i/4096))`` (``int32[4096]``). Then
  ``log2 p(y) · 4096 = 256 (q_y - M) - log2 S``.

Tables (all built on the host with numpy, total ≈ 24 KiB): EXP2 1 KiB, LOG2 16 KiB, RECIP 2 KiB (+ the 64 KiB int8
normal table of :mod:`esx.int_eggroll`). The official code's two 1 GiB device tables are replaced by these.

The parameter pytree (``D = dim``, ``L = layers``, ``H = 4 D``) -- all ``int8``::

    embed [256, D]  head [D, 256]  head_bias [256]  ln_out [D]
    layers: wf, uf, wh, uh [L, D, D]; up [L, D, H]; down [L, H, D]; bf, bh, ln1, ln2 [L, D]
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from esx import int_eggroll as ie

VOCAB = 256
LL_FRAC = 12                 # log-likelihood fixed point: 4096 = 1 bit
EXP2_FRAC = 20


@dataclasses.dataclass(frozen=True)
class EggConfig:
    """Architecture. ``dim`` and ``mlp_mult · dim`` must be powers of 4 (the rescale is then a shift)."""

    dim: int = 64
    layers: int = 1
    mlp_mult: int = 4

    def __post_init__(self):
        for n in (self.dim, self.dim * self.mlp_mult):
            if n < 4 or (n & (n - 1)) or int(math.log2(n)) % 2:
                raise ValueError(f"EggConfig: fan-in {n} must be a power of 4 (dim={self.dim}, mlp_mult={self.mlp_mult})")
        if self.layers < 1:
            raise ValueError(f"EggConfig: layers={self.layers}; must be >= 1")

    @property
    def hidden(self) -> int:
        return self.dim * self.mlp_mult


# ----------------------------------------------------------------------------------------------------------------
# tables


@functools.lru_cache(maxsize=1)
def exp2_table() -> np.ndarray:
    """``int32[255]``: ``round(2^20 · 2^(-d / 16))`` for ``d = 0 .. 254``."""
    d = np.arange(255, dtype=np.float64)
    return np.rint(2.0 ** (EXP2_FRAC - d / 16.0)).astype(np.int32)


@functools.lru_cache(maxsize=1)
def log2_table() -> np.ndarray:
    """``int32[4096]``: ``round(4096 · log2(1 + i / 4096))``."""
    i = np.arange(4096, dtype=np.float64)
    return np.rint(4096.0 * np.log2(1.0 + i / 4096.0)).astype(np.int32)


@functools.lru_cache(maxsize=1)
def recip_table() -> np.ndarray:
    """``int32[509]``: ``round(2^16 · 64 / i)`` (``i = 4 · mean|x|``; entry 0 is unused and set to 0)."""
    i = np.arange(509, dtype=np.float64)
    out = np.zeros(509, np.float64)
    out[1:] = np.rint(2.0**16 * 64.0 / i[1:])
    return out.astype(np.int32)


def table_bytes() -> dict[str, int]:
    """Memory of every lookup table (bytes)."""
    return {"exp2": exp2_table().nbytes, "log2": log2_table().nbytes, "recip": recip_table().nbytes,
            "normal_noise": ie.normal_table().nbytes}


# ----------------------------------------------------------------------------------------------------------------
# parameters


def init_params(key: jax.Array, config: EggConfig = EggConfig()) -> dict:
    """Integer initialisation: matrices ``≈ round(16 · N(0, 1))`` from the int8 normal table, gains 16 (= 1.0), biases 0.

    Returns the parameter dict described in the module docstring (all ``int8``).
    """
    d, h, n_layers = config.dim, config.hidden, config.layers
    table = jnp.asarray(ie.normal_table())
    names = {"embed": (VOCAB, d), "head": (d, VOCAB), "wf": (n_layers, d, d), "uf": (n_layers, d, d),
             "wh": (n_layers, d, d), "uh": (n_layers, d, d), "up": (n_layers, d, h), "down": (n_layers, h, d)}
    w = {name: ie.int_noise(jax.random.fold_in(key, i), shape, table) for i, (name, shape) in enumerate(names.items())}
    gain = lambda *s: jnp.full(s, 16, jnp.int8)  # noqa: E731
    zero = lambda *s: jnp.zeros(s, jnp.int8)  # noqa: E731
    return {
        "embed": w["embed"], "head": w["head"], "head_bias": zero(VOCAB), "ln_out": gain(d),
        "layers": {"wf": w["wf"], "uf": w["uf"], "wh": w["wh"], "uh": w["uh"], "up": w["up"], "down": w["down"],
                   "bf": zero(n_layers, d), "bh": zero(n_layers, d), "ln1": gain(n_layers, d),
                   "ln2": gain(n_layers, d)},
    }


def labels(params: dict) -> dict:
    """Noise labels: every matrix ``"lowrank"``, every vector (biases, gains; stacked ``[L, D]`` too) ``"full"``."""
    vectors = {"head_bias", "ln_out", "bf", "bh", "ln1", "ln2"}

    def lab(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return "full" if name in vectors else "lowrank"

    return jax.tree_util.tree_map_with_path(lab, params)


def num_params(params: dict) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------------------------------
# the integer model


def _shift_of(fan_in: int) -> int:
    return ie.FRAC_BITS + int(math.log2(fan_in)) // 2


def rescale(acc: jax.Array, fan_in: int) -> jax.Array:
    """``int32[...]`` accumulator (units 16·16) -> ``int32[...]`` fixed point, divided by ``16 √fan_in``."""
    return ie.rshift(acc, _shift_of(fan_in))


def layer_norm(x: jax.Array, gain) -> jax.Array:
    """Mean-absolute-value LayerNorm. ``x: int8[..., D]``, ``gain: int8[D]`` (or a perturbed leaf) -> ``int8[..., D]``."""
    d = x.shape[-1]
    xi = x.astype(jnp.int32)
    total = jnp.sum(jnp.abs(xi), axis=-1, keepdims=True)
    idx = jnp.right_shift(total, int(math.log2(d)) - 2)
    y = ie.saturate(jnp.right_shift(xi * jnp.asarray(recip_table())[idx], 16))
    g = ie.int_value(gain).astype(jnp.int32)
    return ie.saturate(ie.rshift(y.astype(jnp.int32) * g, ie.FRAC_BITS))


def _layer(config: EggConfig):
    d, h = config.dim, config.hidden

    def layer(y, xs):
        p, s0, resets = xs
        u = layer_norm(y, p["ln1"])                                   # int8[T, D]
        wf_u = rescale(ie.int_dense(u, p["wf"]), d)                   # int32[T, D]
        wh_u = rescale(ie.int_dense(u, p["wh"]), d)
        bf = ie.int_value(p["bf"]).astype(jnp.int32)
        bh = ie.int_value(p["bh"]).astype(jnp.int32)

        def cell(s, inp):
            wfu, whu, reset = inp
            s = jnp.where(reset, jnp.zeros_like(s), s)
            si = s.astype(jnp.int32)
            f = ie.saturate(wfu + rescale(ie.int_dense(s, p["uf"]), d) + bf)
            gate = f.astype(jnp.int32) + 127                          # [0, 254] ~ [0, 1)
            g = jnp.right_shift(gate * si, 8).astype(jnp.int8)
            hh = ie.saturate(whu + rescale(ie.int_dense(g, p["uh"]), d) + bh)
            new = (si + jnp.right_shift(gate * (hh.astype(jnp.int32) - si), 8)).astype(jnp.int8)
            return new, new

        s_last, hs = lax.scan(cell, s0, (wf_u, wh_u, resets))
        y = ie.saturate(y.astype(jnp.int32) + hs.astype(jnp.int32))
        v = layer_norm(y, p["ln2"])
        z = ie.saturate(rescale(ie.int_dense(v, p["up"]), d))           # int8[T, H]
        y = ie.saturate(y.astype(jnp.int32) + rescale(ie.int_dense(z, p["down"]), h))
        return y, s_last

    return layer


def forward(params: Any, tokens: jax.Array, hidden: jax.Array, resets: jax.Array | None = None,
            *, config: EggConfig = EggConfig()) -> tuple[jax.Array, jax.Array]:
    """Runs the model over one byte sequence.

    Args:
      params: the int8 parameter dict (plain arrays, or a member view of :func:`esx.int_eggroll.int_eggroll`).
      tokens: ``int32[T]`` bytes.
      hidden: ``int8[L, D]`` the recurrent state before ``tokens[0]``.
      resets: ``bool[T]``: reset the state to 0 before position ``t`` (a document starts there). Default: none.

    Returns:
      ``(logits int8[T, 256], hidden int8[L, D])``; logit ``q`` means ``q / 16`` bits (base-2 log-odds).
    """
    if resets is None:
        resets = jnp.zeros(tokens.shape, jnp.bool_)
    d = config.dim
    y = ie.int_embed(tokens, params["embed"])                         # int8[T, D]
    y, hidden = lax.scan(lambda c, xs: _layer(config)(c, (*xs, resets)), y, (params["layers"], hidden))
    out = ie.int_dense(layer_norm(y, params["ln_out"]), params["head"])
    logits = ie.saturate(rescale(out, d) + ie.int_value(params["head_bias"]).astype(jnp.int32))
    return logits, hidden


def log2_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Integer ``log2 p(target)`` with 12 fractional bits.

    Args:
      logits: ``int8[..., 256]`` base-2 log-odds (``q / 16`` bits).
      targets: ``int32[...]`` bytes.

    Returns:
      ``int32[...]``: ``round(4096 · log2 p)`` (``<= 0``), see the module docstring.
    """
    q = logits.astype(jnp.int32)
    top = jnp.max(q, axis=-1, keepdims=True)
    total = jnp.sum(jnp.asarray(exp2_table())[top - q], axis=-1)            # int32 in [2^20, 2^28]
    e = 31 - lax.clz(total)
    idx = jnp.right_shift(total, e - LL_FRAC) - (1 << LL_FRAC)
    log2_total = (e - EXP2_FRAC) * (1 << LL_FRAC) + jnp.asarray(log2_table())[idx]
    q_y = jnp.take_along_axis(q, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (q_y - top[..., 0]) * (1 << (LL_FRAC - 4)) - log2_total


def float_log2_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Reference ``float32`` ``log2 p(target)`` of the same integer logits: ``log_softmax(q ln2 / 16) / ln2``."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32) * (math.log(2.0) / 16.0), axis=-1) / math.log(2.0)
    return jnp.take_along_axis(lp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def make_fitness(config: EggConfig = EggConfig()):
    """The EGG fitness for :func:`esx.int_eggroll.int_eggroll` (``evaluate(..., data_per_member=True, has_aux=True)``).

    ``fitness(view, key, data) -> (int32[] Σ log2 p · 4096, int8[B, L, D] final hidden states)`` where ``data`` is a
    dict ``tokens: int32[B, T + 1]``, ``resets: bool[B, T]``, ``hidden: int8[B, L, D]`` (``B`` streams of one member).
    Higher is better. Keep ``B · T <= 20000`` so the int32 sum cannot overflow (``20000 · LL_BYTE_MAX < 2^31``).
    """

    def fitness(view, key, data):
        del key
        tokens = data["tokens"]

        def one(tok, res, hid):
            logits, hid = forward(view, tok[:-1], hid, res, config=config)
            return jnp.sum(log2_likelihood(logits, tok[1:])), hid

        ll, hidden = jax.vmap(one)(tokens, data["resets"], data["hidden"])
        return jnp.sum(ll), hidden

    return fitness


# ----------------------------------------------------------------------------------------------------------------
# evaluation and sampling


#: The largest ``|round(4096 · log2 p)|`` of one byte (:func:`log2_likelihood`): logits are ``int8`` in
#: ``[-127, 127]``, so ``256 (q_y - M) >= -256 · 254 = -65024``, and ``2^20 <= S = Σ_b EXP2[M - q_b] <= 256 · 2^20``
#: puts the subtracted ``log2_total = 4096 (log2 S - 20)`` in ``[0, 8 · 4096 = 32768]``: ``-97792 <= ll <= 0``,
#: below ``2^17`` in magnitude.
LL_BYTE_MAX = 254 * (1 << (LL_FRAC - 4)) + (28 - EXP2_FRAC) * (1 << LL_FRAC)
#: Bytes of one stream that :func:`bits_per_byte` sums in ``int32`` inside the model (one "piece"):
#: ``16384 · 97792 = 1.60e9 < 2^31 - 1``, so a piece's sum is exact; pieces are added in int64 on the host.
EVAL_PIECE = 1 << 14
#: Predicted bytes per jitted call of :func:`bits_per_byte` (streams × piece; bounds its memory).
_EVAL_CALL_BYTES = 1 << 16

assert EVAL_PIECE * LL_BYTE_MAX < 2**31 - 1


@functools.partial(jax.jit, static_argnames=("config",))
def _piece_ll(params, tokens, resets, mask, hidden, config):
    """One piece of every stream: ``tokens int32[S, P + 1]``, ``resets/mask bool[S, P]``, ``hidden int8[S, L, D]``
    -> (``int32[S]`` Σ of the masked per-byte log-likelihoods (``P <= EVAL_PIECE``: exact), the hidden states)."""
    def one(tok, res, m, hid):
        logits, hid = forward(params, tok[:-1], hid, res, config=config)
        ll = jnp.where(m, log2_likelihood(logits, tok[1:]), 0)
        return jnp.sum(ll), hid
    return jax.vmap(one)(tokens, resets, mask, hidden)


def bits_per_byte(params: dict, data: np.ndarray, *, config: EggConfig = EggConfig(), streams: int = 64,
                  length: int | None = None, doc_starts: np.ndarray | None = None) -> float:
    """Validation bits per byte by the integer log-likelihood, exact for any split.

    ``data: uint8[n]`` is cut into ``streams`` contiguous chunks: stream ``k`` is ``length`` bytes from
    ``k · (n // streams)`` (default and most: ``n // streams``), read from a zero hidden state (reset again where
    ``doc_starts`` is set), so every byte of it but the first is predicted. Returns
    ``-Σ log2 p / (streams · (length - 1))``, each ``log2 p`` the model's integer ``round(4096 · log2 p) / 4096``.

    The model stays integer-only: it runs each stream in pieces of at most :data:`EVAL_PIECE` bytes (carrying the
    hidden state, so the result does not depend on the pieces) and sums each piece in ``int32``, which cannot
    overflow (:data:`LL_BYTE_MAX`); the pieces' sums are added in ``int64`` on the host. The total is thus exact
    however long the streams are (``streams=1`` reads the whole split as one stream).
    """
    data = np.asarray(data, np.uint8)
    n = len(data)
    if streams < 1 or n // streams < 2:
        raise ValueError(f"bits_per_byte: {n} bytes cannot be cut into streams={streams} streams of >= 2 bytes")
    stride = n // streams
    length = stride if length is None else min(length, stride)
    if length < 2:
        raise ValueError(f"bits_per_byte: length={length}; must be >= 2 (the first byte of a stream is not predicted)")
    starts = None if doc_starts is None else np.asarray(doc_starts, bool)
    steps = length - 1                                               # predicted bytes per stream
    piece = min(steps, EVAL_PIECE)
    calls = -(-streams // max(1, _EVAL_CALL_BYTES // piece))
    batch = -(-streams // calls)                                     # streams per call, balanced
    sums = []
    for first in range(0, streams, batch):
        ids = np.arange(first, first + batch)
        real = ids < streams                                         # the last batch is padded with stream 0
        base = np.where(real, ids, 0) * stride
        hidden = jnp.zeros((batch, config.layers, config.dim), jnp.int8)
        for lo in range(0, steps, piece):
            k = min(piece, steps - lo)                                # predicted bytes in this piece
            tok = np.zeros((batch, piece + 1), np.int32)
            res = np.zeros((batch, piece), bool)
            mask = np.zeros((batch, piece), bool)
            pos = base[:, None] + lo + np.arange(k + 1)[None, :]
            tok[:, :k + 1] = data[pos]
            if starts is not None:
                res[:, :k] = starts[pos[:, :k]]
            mask[:, :k] = real[:, None]
            ll, hidden = _piece_ll(params, tok, res, mask, hidden, config)
            sums.append(ll)
    total = int(sum(np.asarray(s, np.int64).sum() for s in sums))   # exact in int64 (host)
    return -total / (1 << LL_FRAC) / (streams * steps)


@functools.partial(jax.jit, static_argnames=("config",))
def _sample_step(params, token, hidden, key, temperature, config):
    logits, hidden = forward(params, token[None], hidden, config=config)
    z = logits[0].astype(jnp.float32) * (math.log(2.0) / 16.0) / temperature
    nxt = jax.random.categorical(key, z).astype(jnp.int32)
    return nxt, hidden


def sample(params: dict, prompt: bytes | str, length: int, key: jax.Array, *, config: EggConfig = EggConfig(),
           temperature: float = 1.0) -> str:
    """Generates ``length`` bytes after ``prompt`` (the model runs in integers; the draw itself uses float
    ``jax.random.categorical`` on ``q ln2 / 16 / temperature``). Returns the decoded text (invalid UTF-8 replaced)."""
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    if not prompt:
        prompt = b"\n"
    hidden = jnp.zeros((config.layers, config.dim), jnp.int8)
    temp = jnp.asarray(temperature, jnp.float32)
    token = jnp.asarray(prompt[0], jnp.int32)
    out = bytearray(prompt)
    for i, b in enumerate(prompt[1:] + b"\0" * length):
        key, sub = jax.random.split(key)
        nxt, hidden = _sample_step(params, token, hidden, sub, temp, config)
        if i + 1 < len(prompt):
            token = jnp.asarray(prompt[i + 1], jnp.int32)
        else:
            out.append(int(nxt))
            token = nxt
        if len(out) >= len(prompt) + length:
            break
    return bytes(out).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------------
# one generation of truncated ES


def make_generation(strategy, config: EggConfig = EggConfig()):
    """A jitted generation of integer EGGROLL on the EGG model with carried hidden states (truncated ES).

    Returns ``generation(state, hidden, tokens, resets) -> (state, hidden, metrics)`` with
    ``hidden: int8[N, B, L, D]`` (one state per member and stream, carried from the previous generation),
    ``tokens: int32[G, B, T + 1]`` and ``resets: bool[G, B, T]`` for the ``G = N / group_size`` groups (every member
    of a group reads the same ``B`` streams). The carried states are zeroed where ``resets`` is set.
    """
    fitness = make_fitness(config)
    group = strategy.config.group_size

    @jax.jit
    def generation(state, hidden, tokens, resets):
        data = {"tokens": jnp.repeat(tokens, group, axis=0), "resets": jnp.repeat(resets, group, axis=0),
                "hidden": hidden}
        fit, hidden = strategy.evaluate(state, fitness, state.key, data, data_per_member=True, has_aux=True)
        state, metrics = strategy.tell(state, fit)
        return state, hidden, metrics

    return generation


def initial_hidden(population_size: int, streams: int, config: EggConfig = EggConfig()) -> jax.Array:
    """``int8[N, B, L, D]`` zeros."""
    return jnp.zeros((population_size, streams, config.layers, config.dim), jnp.int8)


# ----------------------------------------------------------------------------------------------------------------
# the shared training driver (``esx train egg-shakespeare``)

#: Reference bits/byte of tinyshakespeare's validation split (../shared/data/README.md).
