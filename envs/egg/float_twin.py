"""The float twin of the EGG model: the same architecture in ``float32``, trainable by float EGGROLL and by backprop.

Every integer operation of :mod:`esx_envs.egg` is mirrored on real values (``q / 16``):

* saturation ``sat`` -> ``clip(x, -127/16, 127/16)``; matmuls ``x @ W / √fan_in``;
* LayerNorm ``g · x / mean|x|``; the cell's gate ``(16 f + 127) / 256``; the head's logits are base-2 log-odds
  (``log2 p = log_softmax(l ln 2) / ln 2``).

Parameters have the names and shapes of :func:`esx_envs.egg.init_params` (``float32``, weights ``≈ N(0, 1)``, gains 1,
biases 0). The model calls :func:`esx.dense`, :func:`esx.embed`, :func:`esx.value`, so ``esx.eggroll`` perturbs it
with low-rank noise and ``jax.grad`` differentiates it.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import esx
from esx_envs.egg.model import VOCAB, EggConfig

LIMIT = 127.0 / 16.0


def sat(x: jax.Array) -> jax.Array:
    return jnp.clip(x, -LIMIT, LIMIT)


def init_params(key: jax.Array, config: EggConfig = EggConfig()) -> dict:
    """``float32`` parameters with the structure of :func:`esx_envs.egg.init_params`."""
    d, h, n = config.dim, config.hidden, config.layers
    shapes = {"embed": (VOCAB, d), "head": (d, VOCAB), "wf": (n, d, d), "uf": (n, d, d), "wh": (n, d, d),
              "uh": (n, d, d), "up": (n, d, h), "down": (n, h, d)}
    w = {k: jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) for i, (k, s) in enumerate(shapes.items())}
    return {
        "embed": w["embed"], "head": w["head"], "head_bias": jnp.zeros(VOCAB), "ln_out": jnp.ones(d),
        "layers": {"wf": w["wf"], "uf": w["uf"], "wh": w["wh"], "uh": w["uh"], "up": w["up"], "down": w["down"],
                   "bf": jnp.zeros((n, d)), "bh": jnp.zeros((n, d)), "ln1": jnp.ones((n, d)), "ln2": jnp.ones((n, d))},
    }


def _is_perturbed(x) -> bool:
    return isinstance(x, (esx.LowRank, esx.Full))


def _slice(leaf, i):
    """Layer ``i`` of a stacked leaf: plain array, :class:`esx.LowRank` (coef per layer) or :class:`esx.Full`."""
    if isinstance(leaf, esx.LowRank):
        return esx.LowRank(leaf.base[i], leaf.a[i], leaf.b[i], leaf.coef[i])
    if isinstance(leaf, esx.Full):
        return esx.Full(leaf.base[i], leaf.eps[i], leaf.coef[i])
    return leaf[i]


def _mm(x, w, fan_in):
    return esx.dense(x, w) * (1.0 / math.sqrt(fan_in))


def layer_norm(x, gain):
    return sat(x / (jnp.mean(jnp.abs(x), axis=-1, keepdims=True) + 1e-6) * esx.value(gain))


def forward(params: Any, tokens: jax.Array, hidden: jax.Array, resets: jax.Array | None = None, *,
            config: EggConfig = EggConfig()) -> tuple[jax.Array, jax.Array]:
    """``tokens: int32[T]``, ``hidden: float32[L, D]`` -> ``(logits float32[T, 256] (base-2), hidden float32[L, D])``."""
    if resets is None:
        resets = jnp.zeros(tokens.shape, jnp.bool_)
    d, h = config.dim, config.hidden

    def layer(y, xs):
        p, s0 = xs
        u = layer_norm(y, p["ln1"])
        wf_u, wh_u = _mm(u, p["wf"], d), _mm(u, p["wh"], d)
        bf, bh = esx.value(p["bf"]), esx.value(p["bh"])

        def cell(s, inp):
            wfu, whu, reset = inp
            s = jnp.where(reset, 0.0, s)
            f = sat(wfu + _mm(s, p["uf"], d) + bf)
            gate = (16.0 * f + 127.0) / 256.0
            hh = sat(whu + _mm(gate * s, p["uh"], d) + bh)
            new = s + gate * (hh - s)
            return new, new

        s_last, hs = lax.scan(cell, s0, (wf_u, wh_u, resets))
        y = sat(y + hs)
        z = sat(_mm(layer_norm(y, p["ln2"]), p["up"], d))
        return sat(y + _mm(z, p["down"], h)), s_last

    y = sat(esx.embed(tokens, params["embed"]))
    # A Python loop over layers (not lax.scan): esx.Full keeps a scalar coef, so perturbed stacked vectors
    # cannot be sliced by scan.
    finals = []
    for i in range(config.layers):
        y, s_last = layer(y, (jax.tree_util.tree_map(lambda leaf: _slice(leaf, i), params["layers"],
                                                     is_leaf=_is_perturbed), hidden[i]))
        finals.append(s_last)
    hidden = jnp.stack(finals)
    logits = sat(_mm(layer_norm(y, params["ln_out"]), params["head"], d) + esx.value(params["head_bias"]))
    return logits, hidden


def log2_likelihood(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``float32[..., 256]`` base-2 logits -> ``float32[...]`` ``log2 p(target)``."""
    lp = jax.nn.log_softmax(logits * math.log(2.0), axis=-1) / math.log(2.0)
    return jnp.take_along_axis(lp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def stream_ll(params, tokens, resets, hidden, config):
    """Sum of ``log2 p`` over ``B`` streams: ``tokens int32[B, T+1]``, ``hidden float32[B, L, D]``."""
    def one(tok, res, hid):
        logits, hid = forward(params, tok[:-1], hid, res, config=config)
        return jnp.sum(log2_likelihood(logits, tok[1:])), hid
    ll, hidden = jax.vmap(one)(tokens, resets, hidden)
    return jnp.sum(ll), hidden


def make_es_generation(strategy: esx.Strategy, config: EggConfig = EggConfig()):
    """Float EGGROLL with carried member hidden states (as :func:`esx_envs.egg.make_generation`).

    ``generation(state, hidden float32[N, B, L, D], tokens int32[G, B, T+1], resets bool[G, B, T])``.
    Uses ``ask`` / ``view`` so every member gets its own carried state.
    """
    group = strategy.config.group_size
    n = strategy.config.population_size

    @jax.jit
    def generation(state, hidden, tokens, resets):
        pop = strategy.ask(state)
        tok, res = jnp.repeat(tokens, group, axis=0), jnp.repeat(resets, group, axis=0)

        def member(m, t, r, hid):
            return stream_ll(strategy.view(state, pop, m), t, r, hid, config)

        fit, hidden = jax.vmap(member)(jnp.arange(n, dtype=jnp.int32), tok, res, hidden)
        state, metrics = strategy.tell(state, fit)
        return state, hidden, metrics

    return generation


def make_backprop_step(optimizer: optax.GradientTransformation, config: EggConfig = EggConfig()):
    """Truncated backprop through time: ``step(params, opt_state, hidden float32[B, L, D], tokens int32[B, T+1],
    resets bool[B, T]) -> (params, opt_state, hidden, mean bits/byte)``; the hidden state is carried, not
    differentiated across steps."""

    def loss(params, hidden, tokens, resets):
        ll, hidden = stream_ll(params, tokens, resets, hidden, config)
        return -ll / (tokens.shape[0] * (tokens.shape[1] - 1)), hidden

    @jax.jit
    def step(params, opt_state, hidden, tokens, resets):
        (value, hidden), grads = jax.value_and_grad(loss, has_aux=True)(params, hidden, tokens, resets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, lax.stop_gradient(hidden), value

    return step


@functools.partial(jax.jit, static_argnames=("config",))
def _val_ll(params, tokens, config):
    def one(tok):
        logits, _ = forward(params, tok[:-1], jnp.zeros((config.layers, config.dim)), config=config)
        return jnp.sum(log2_likelihood(logits, tok[1:]))
    return jax.vmap(one)(tokens)


def bits_per_byte(params: dict, data: np.ndarray, *, config: EggConfig = EggConfig(), streams: int = 64,
                  length: int | None = None) -> float:
    """Validation bits/byte with the same chunking as :func:`esx_envs.egg.bits_per_byte`."""
    data = np.asarray(data, np.uint8)
    if length is None:
        length = len(data) // streams
    length = min(length, len(data) // streams)
    toks = np.stack([data[k * (len(data) // streams):k * (len(data) // streams) + length] for k in range(streams)])
    ll = np.asarray(_val_ll(params, jnp.asarray(toks.astype(np.int32)), config), np.float64)
    return float(-ll.sum() / (streams * (length - 1)))
