"""Interop benchmark (issue #21): a model run through ``esx.interop`` vs the same model hand-written with esx ops.

A benchmark script, not a timed test. For each case and framework it builds one strategy (the adapter's
``labels(...)``) and one initial state (the same init key), so that every path of that framework sees the same
labels, the same parameters and the same noise, and times ``strategy.make_step(fitness)`` (evaluate + tell, one
``jit``) for three fitness functions over the same state:

* ``esx``          -- the model hand-written with ``esx.dense`` / ``esx.embed`` / ``esx.value`` over the framework's
                      own parameter tree (``layout="out_in"`` for Equinox's ``[out, in]`` weights; attention's
                      ``[d, heads, head_dim]`` / ``[heads, head_dim, d]`` kernels as ``"lowrank:1"`` /
                      ``"lowrank:2"`` tensor views);
* ``interop``      -- the unchanged framework model through its adapter (``esx.interop.linen.apply``,
                      ``esx.interop.nnx.merge``, ``esx.interop.equinox.combine``);
* ``materialised`` -- the unchanged framework model on ``jax.tree.map(esx.value, view, ...)``: every member forms
                      its full weight matrices (what one would do without the adapters).

Cases: ``mlp`` (three ``W×W`` Dense + bias + tanh layers, ``W = 1024``, one input row per member, N = 256) and
``transformer`` (4 pre-LayerNorm blocks, width 256, 4 heads, MLP 4×, 64 tokens, vocab 256, learned positions,
causal next-token cross-entropy, N = 32); rank 4.

Before timing, every path's population fitness (``strategy.evaluate``, same state and key) is checked against the
hand-written one (``max |Δ| <= 1e-4 · max(1, max |f|)``); a path that fails is not timed and the script exits 1.
Within each repeat the paths run in turn, so load drifts hit all of them alike: each framework's ``esx`` and
``interop`` paths next to each other (A B, then B A in the next repeat), then the ``materialised`` paths, each followed
by a pause (``--settle``: right after a materialised block, whatever ran next was up to 1.7x slower). Ratios are taken
per repeat and then summarised (median, min–max). After the table, each
path's ``strategy.evaluate`` jaxpr is compared with the hand-written one (same matrix products or not, equation
counts, XLA's flop estimate): the first place to look when an adapter is slower.

    python scripts/interop_bench.py                                   # the defaults (docs/interop_bench.txt)
    python scripts/interop_bench.py --cases mlp --frameworks linen --population 1024 --json out.json
    python scripts/interop_bench.py --tiny --repeats 1 --generations 1   # plumbing only (XLA level 0): minutes
    python scripts/interop_bench.py --tiny --repeats 1 --generations 1 --cases mlp --frameworks linen  # the smoke test
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import esx

FRAMEWORKS = ("linen", "nnx", "equinox")
CASES = ("mlp", "transformer")
KINDS = ("esx", "interop", "materialised")
TARGET = 0.95          # interop throughput / hand-written throughput


# ---------------------------------------------------------------------------------------------------------------
# sizes


@dataclasses.dataclass(frozen=True)
class Sizes:
    width: int = 1024         # MLP width (input width too)
    depth: int = 3            # MLP layers
    d: int = 256              # transformer width
    heads: int = 4
    blocks: int = 4
    tokens: int = 64
    vocab: int = 256


TINY = Sizes(width=32, depth=3, d=16, heads=2, blocks=1, tokens=8, vocab=16)


def _is_view(x) -> bool:
    return isinstance(x, (esx.LowRank, esx.Full))


def materialise(view):
    """Every leaf of a member view as a plain array (a full ``m×n`` matrix per member for low-rank leaves)."""
    return jax.tree.map(esx.value, view, is_leaf=_is_view)


# ---------------------------------------------------------------------------------------------------------------
# the hand-written models (esx ops), over a normalised list of the framework's leaves


def esx_mlp(layers: list, x: jax.Array, layout: str) -> jax.Array:
    """``layers = [(kernel, bias)]``: ``tanh(x W + b)`` per layer."""
    h = x
    for w, b in layers:
        h = jnp.tanh(esx.dense(h, w, layout=layout) + esx.value(b))
    return h


def _layer_norm(x, scale, bias, eps):
    """Flax's LayerNorm (mean of squares minus squared mean); Equinox's ``jnp.var`` agrees to float rounding."""
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
    return (x - mean) * jax.lax.rsqrt(var + eps) * esx.value(scale) + esx.value(bias)


def _causal_attention(q, k, v):
    """``softmax(q kᵀ / √d + causal mask) v`` over ``[L, heads, d]`` (the frameworks' formula: masked logits set to
    the dtype's minimum)."""
    L = q.shape[0]
    logits = jnp.einsum("qhd,khd->hqk", q / math.sqrt(q.shape[-1]), k)
    mask = jnp.tril(jnp.ones((L, L), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v)


def esx_transformer(p: dict, ids: jax.Array, sz: Sizes, layout: str, eps: float) -> jax.Array:
    """The pre-LN decoder, hand-written. ``p``: ``embed``, ``pos``, ``blocks`` (dicts with ``ln1``/``ln2``
    ``(scale, bias)``, ``q``/``k``/``v``/``o``/``fc1``/``fc2`` ``(kernel, bias)``), ``ln_f``, ``head``.

    ``layout="in_out"`` (Flax): q/k/v kernels ``[d, heads, head_dim]`` ("lowrank:1"), the output kernel
    ``[heads, head_dim, d]`` ("lowrank:2"), contracted by ``esx.dense`` directly. ``"out_in"`` (Equinox):
    ``[heads·head_dim, d]`` / ``[d, heads·head_dim]`` matrices, reshaped around the product.

    The residual adds are ``x + (dense(h, W) + b)``, as the frameworks associate them (a layer returns ``xW + b``).
    Written ``x + dense(h, W) + b`` the same model ran 1.25-1.3x slower on XLA:CPU (linen, N=32): the bias add
    moved onto the residual stream and XLA fused and recomputed it, with a transpose, in many consumers (121 instead
    of 21 transposes of the ``[2, pairs, L, d]`` activations in the optimised HLO)."""
    L = ids.shape[-1]
    x = esx.embed(ids, p["embed"]) + esx.embed(jnp.arange(L), p["pos"])

    def proj(h, wb):
        y = esx.dense(h, wb[0], layout=layout) + esx.value(wb[1])
        return y if layout == "in_out" else y.reshape(L, sz.heads, -1)

    for blk in p["blocks"]:
        h = _layer_norm(x, *blk["ln1"], eps)
        o = _causal_attention(proj(h, blk["q"]), proj(h, blk["k"]), proj(h, blk["v"]))
        if layout != "in_out":
            o = o.reshape(L, -1)
        x = x + (esx.dense(o, blk["o"][0], layout=layout) + esx.value(blk["o"][1]))
        h = _layer_norm(x, *blk["ln2"], eps)
        h = jax.nn.gelu(esx.dense(h, blk["fc1"][0], layout=layout) + esx.value(blk["fc1"][1]))
        x = x + (esx.dense(h, blk["fc2"][0], layout=layout) + esx.value(blk["fc2"][1]))
    x = _layer_norm(x, *p["ln_f"], eps)
    return esx.dense(x, p["head"][0], layout=layout) + esx.value(p["head"][1])


def next_token_fitness(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """``-mean cross-entropy`` of predicting ``ids[1:]`` from ``logits[:-1]``."""
    logp = jax.nn.log_softmax(logits[:-1], axis=-1)
    return jnp.mean(jnp.take_along_axis(logp, ids[1:, None], axis=-1))


def mse_fitness(y: jax.Array, target: jax.Array) -> jax.Array:
    return -jnp.mean((y - target) ** 2)


# ---------------------------------------------------------------------------------------------------------------
# one framework = one strategy, one state, and the fitness of each path


@dataclasses.dataclass
class Setup:
    case: str
    framework: str
    params: Any
    labels: Any
    data: Any
    fitness: dict           # kind -> fitness(view, key, data)
    note: str = ""


def _mlp_data(sz: Sizes):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=sz.width), jnp.float32)
    y = jnp.asarray(rng.uniform(-0.5, 0.5, size=sz.width), jnp.float32)
    return {"x": x, "y": y}


def _tokens(sz: Sizes):
    return jnp.asarray(np.random.default_rng(1).integers(0, sz.vocab, sz.tokens), jnp.int32)


def _mlp_fitnesses(forward: dict) -> dict:
    return {kind: (lambda f: lambda view, key, data: mse_fitness(f(view, data["x"]), data["y"]))(fn)
            for kind, fn in forward.items()}


def _lm_fitnesses(forward: dict) -> dict:
    return {kind: (lambda f: lambda view, key, ids: next_token_fitness(f(view, ids), ids))(fn)
            for kind, fn in forward.items()}


def setup_linen(case: str, sz: Sizes, key) -> Setup:
    import flax.linen as nn

    import esx.interop.linen as esx_linen

    if case == "mlp":
        class MLP(nn.Module):
            width: int
            depth: int

            @nn.compact
            def __call__(self, x):
                for _ in range(self.depth):
                    x = jnp.tanh(nn.Dense(self.width)(x))
                return x

        model = MLP(sz.width, sz.depth)
        data = _mlp_data(sz)
        variables = model.init(key, data["x"])
        labels = esx_linen.labels(model, variables, data["x"])

        def hand(view, x):
            p = view["params"]
            return esx_mlp([(p[f"Dense_{i}"]["kernel"], p[f"Dense_{i}"]["bias"]) for i in range(sz.depth)], x,
                           "in_out")

        return Setup(case, "linen", variables, labels, data, _mlp_fitnesses({
            "esx": hand,
            "interop": lambda view, x: esx_linen.apply(model, view, x),
            "materialised": lambda view, x: model.apply(materialise(view), x)}))

    class Block(nn.Module):
        d: int
        heads: int

        @nn.compact
        def __call__(self, x, mask):
            h = nn.LayerNorm(name="ln1")(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.d, out_features=self.d,
                                                    name="attn")(h, mask=mask)
            h = nn.gelu(nn.Dense(4 * self.d, name="fc1")(nn.LayerNorm(name="ln2")(x)))
            return x + nn.Dense(self.d, name="fc2")(h)

    class LM(nn.Module):
        sz: Sizes

        @nn.compact
        def __call__(self, ids):
            s = self.sz
            L = ids.shape[-1]
            x = nn.Embed(s.vocab, s.d, name="embed")(ids) + nn.Embed(s.tokens, s.d, name="pos")(jnp.arange(L))
            mask = nn.make_causal_mask(ids)
            for i in range(s.blocks):
                x = Block(s.d, s.heads, name=f"block_{i}")(x, mask)
            return nn.Dense(s.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))

    model = LM(sz)
    ids = _tokens(sz)
    variables = model.init(key, ids)
    labels = esx_linen.labels(model, variables, ids)
    eps = nn.LayerNorm.epsilon

    def hand(view, ids):
        p = view["params"]
        kb = lambda d: (d["kernel"], d["bias"])   # noqa: E731
        sb = lambda d: (d["scale"], d["bias"])    # noqa: E731
        blocks = [dict(ln1=sb(b["ln1"]), ln2=sb(b["ln2"]), q=kb(b["attn"]["query"]), k=kb(b["attn"]["key"]),
                       v=kb(b["attn"]["value"]), o=kb(b["attn"]["out"]), fc1=kb(b["fc1"]), fc2=kb(b["fc2"]))
                  for b in (p[f"block_{i}"] for i in range(sz.blocks))]
        tree = dict(embed=p["embed"]["embedding"], pos=p["pos"]["embedding"], blocks=blocks, ln_f=sb(p["ln_f"]),
                    head=kb(p["head"]))
        return esx_transformer(tree, ids, sz, "in_out", eps)

    return Setup(case, "linen", variables, labels, ids, _lm_fitnesses({
        "esx": hand,
        "interop": lambda view, ids: esx_linen.apply(model, view, ids),
        "materialised": lambda view, ids: model.apply(materialise(view), ids)}))


def setup_nnx(case: str, sz: Sizes, key) -> Setup:
    from flax import nnx

    import esx.interop.nnx as esx_nnx

    rngs = nnx.Rngs(key)
    val = lambda var: var.get_value()   # noqa: E731  (a view's nnx.Param holds the member view)

    if case == "mlp":
        class MLP(nnx.Module):
            def __init__(self, width, depth, rngs):
                self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(depth)])

            def __call__(self, x):
                for layer in self.layers:
                    x = jnp.tanh(layer(x))
                return x

        model = MLP(sz.width, sz.depth, rngs)
        graphdef, params, rest = esx_nnx.split(model)

        def hand(view, x):
            return esx_mlp([(val(view["layers"][i]["kernel"]), val(view["layers"][i]["bias"]))
                            for i in range(sz.depth)], x, "in_out")

        return Setup(case, "nnx", params, esx_nnx.labels(model), _mlp_data(sz), _mlp_fitnesses({
            "esx": hand,
            "interop": lambda view, x: esx_nnx.merge(graphdef, view, rest)(x),
            "materialised": lambda view, x: nnx.merge(graphdef, materialise(view), rest)(x)}))

    class Block(nnx.Module):
        def __init__(self, d, heads, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, qkv_features=d, out_features=d,
                                               decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
            self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x, mask):
            x = x + self.attn(self.ln1(x), mask=mask)
            return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

    class LM(nnx.Module):
        def __init__(self, s: Sizes, rngs):
            self.embed = nnx.Embed(s.vocab, s.d, rngs=rngs)
            self.pos = nnx.Embed(s.tokens, s.d, rngs=rngs)
            self.blocks = nnx.List([Block(s.d, s.heads, rngs) for _ in range(s.blocks)])
            self.ln_f = nnx.LayerNorm(s.d, rngs=rngs)
            self.head = nnx.Linear(s.d, s.vocab, rngs=rngs)

        def __call__(self, ids):
            x = self.embed(ids) + self.pos(jnp.arange(ids.shape[-1]))
            mask = nnx.make_causal_mask(ids)
            for blk in self.blocks:
                x = blk(x, mask)
            return self.head(self.ln_f(x))

    model = LM(sz, rngs)
    graphdef, params, rest = esx_nnx.split(model)
    eps = model.ln_f.epsilon

    def hand(view, ids):
        kb = lambda d: (val(d["kernel"]), val(d["bias"]))   # noqa: E731
        sb = lambda d: (val(d["scale"]), val(d["bias"]))    # noqa: E731
        blocks = [dict(ln1=sb(b["ln1"]), ln2=sb(b["ln2"]), q=kb(b["attn"]["query"]), k=kb(b["attn"]["key"]),
                       v=kb(b["attn"]["value"]), o=kb(b["attn"]["out"]), fc1=kb(b["fc1"]), fc2=kb(b["fc2"]))
                  for b in (view["blocks"][i] for i in range(sz.blocks))]
        tree = dict(embed=val(view["embed"]["embedding"]), pos=val(view["pos"]["embedding"]), blocks=blocks,
                    ln_f=sb(view["ln_f"]), head=kb(view["head"]))
        return esx_transformer(tree, ids, sz, "in_out", eps)

    return Setup(case, "nnx", params, esx_nnx.labels(model), _tokens(sz), _lm_fitnesses({
        "esx": hand,
        "interop": lambda view, ids: esx_nnx.merge(graphdef, view, rest)(ids),
        "materialised": lambda view, ids: nnx.merge(graphdef, materialise(view), rest)(ids)}))


def setup_equinox(case: str, sz: Sizes, key) -> Setup:
    import equinox as eqx

    import esx.interop.equinox as esx_eqx

    if case == "mlp":
        model = eqx.nn.MLP(sz.width, sz.width, sz.width, depth=sz.depth - 1, activation=jnp.tanh,
                           final_activation=jnp.tanh, key=key)
        params, static = esx_eqx.partition(model)

        def hand(view, x):
            return esx_mlp([(layer.weight, layer.bias) for layer in view.layers], x, "out_in")

        return Setup(case, "equinox", params, esx_eqx.labels(params), _mlp_data(sz), _mlp_fitnesses({
            "esx": hand,
            "interop": lambda view, x: esx_eqx.combine(view, static)(x),
            "materialised": lambda view, x: eqx.combine(materialise(view), static)(x)}))

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear

        def __init__(self, d, heads, key):
            k = jax.random.split(key, 3)
            self.ln1, self.ln2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
            self.attn = eqx.nn.MultiheadAttention(heads, d, use_query_bias=True, use_key_bias=True,
                                                  use_value_bias=True, use_output_bias=True, key=k[0])
            self.fc1 = eqx.nn.Linear(d, 4 * d, key=k[1])
            self.fc2 = eqx.nn.Linear(4 * d, d, key=k[2])

        def __call__(self, x, mask):                        # x [L, d]: Equinox's per-example convention
            h = jax.vmap(self.ln1)(x)
            x = x + self.attn(h, h, h, mask=mask)
            h = jax.nn.gelu(jax.vmap(self.fc1)(jax.vmap(self.ln2)(x)))
            return x + jax.vmap(self.fc2)(h)

    class LM(eqx.Module):
        embed: eqx.nn.Embedding
        pos: eqx.nn.Embedding
        blocks: list
        ln_f: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __init__(self, s: Sizes, key):
            k = jax.random.split(key, s.blocks + 3)
            self.embed = eqx.nn.Embedding(s.vocab, s.d, key=k[0])
            self.pos = eqx.nn.Embedding(s.tokens, s.d, key=k[1])
            self.blocks = [Block(s.d, s.heads, k[3 + i]) for i in range(s.blocks)]
            self.ln_f = eqx.nn.LayerNorm(s.d)
            self.head = eqx.nn.Linear(s.d, s.vocab, key=k[2])

        def __call__(self, ids):
            L = ids.shape[-1]
            x = jax.vmap(self.embed)(ids) + jax.vmap(self.pos)(jnp.arange(L))
            mask = jnp.tril(jnp.ones((L, L), bool))
            for blk in self.blocks:
                x = blk(x, mask)
            return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))

    model = LM(sz, key)
    params, static = esx_eqx.partition(model)
    eps = model.ln_f.eps

    def hand(view, ids):
        kb = lambda lin: (lin.weight, lin.bias)   # noqa: E731
        sb = lambda ln: (ln.weight, ln.bias)      # noqa: E731
        blocks = [dict(ln1=sb(b.ln1), ln2=sb(b.ln2), q=kb(b.attn.query_proj), k=kb(b.attn.key_proj),
                       v=kb(b.attn.value_proj), o=kb(b.attn.output_proj), fc1=kb(b.fc1), fc2=kb(b.fc2))
                  for b in view.blocks]
        tree = dict(embed=view.embed.weight, pos=view.pos.weight, blocks=blocks, ln_f=sb(view.ln_f),
                    head=kb(view.head))
        return esx_transformer(tree, ids, sz, "out_in", eps)

    return Setup(case, "equinox", params, esx_eqx.labels(params), _tokens(sz), _lm_fitnesses({
        "esx": hand,
        "interop": lambda view, ids: esx_eqx.combine(view, static)(ids),
        "materialised": lambda view, ids: eqx.combine(materialise(view), static)(ids)}))


SETUPS: dict[str, Callable] = {"linen": setup_linen, "nnx": setup_nnx, "equinox": setup_equinox}


# ---------------------------------------------------------------------------------------------------------------
# running


@dataclasses.dataclass
class Path:
    case: str
    framework: str
    kind: str
    fitness: Callable
    strategy: Any
    state: Any
    data: Any
    ok: bool = True
    check: str = ""
    compile_s: float = float("nan")
    gflop: float = float("nan")
    eqns: int = 0
    dots: Any = None        # collections.Counter of the evaluate jaxpr's dot_generals
    ms: list = dataclasses.field(default_factory=list)    # ms per generation, one entry per repeat
    compiled: Any = None

    @property
    def name(self) -> str:
        return f"{self.framework}/{self.kind}"


def jaxpr_summary(fn, *args) -> tuple[int, collections.Counter]:
    """``(equations, matmuls)`` of the jaxpr of ``fn(*args)``, sub-jaxprs (pjit, custom_jvp, scan bodies)
    included; ``matmuls`` counts each ``dot_general`` by its operand shapes and dimension numbers, so two programs
    with equal counters do the same matrix products (the rest is elementwise work, layout and order)."""
    dots: collections.Counter = collections.Counter()

    def walk(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            n += 1
            if eqn.primitive.name == "dot_general":
                shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
                dots[f"{shapes} {eqn.params['dimension_numbers']}"] += 1
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (list, tuple)) else (v,)):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        n += walk(inner)
        return n

    return walk(jax.make_jaxpr(fn)(*args).jaxpr), dots


def check_paths(paths: list[Path], out) -> None:
    """Each path's population fitness (``strategy.evaluate``, same state and key) against the hand-written one."""
    ref = paths[0]
    assert ref.kind == "esx"
    key = jax.random.key(12345)

    @jax.jit
    def run(state, key, data):
        return [ref.strategy.evaluate(state, p.fitness, key, data) for p in paths]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = [np.asarray(f) for f in run(ref.state, key, ref.data)]
    notes = [str(w.message).split(":")[0] + ": " + str(w.category.__name__) for w in caught
             if "Materialize" in w.category.__name__]
    f0 = fits[0]
    scale = max(1.0, float(np.max(np.abs(f0))))
    spread = float(np.std(f0))
    for p, f in zip(paths, fits):
        if p is ref:
            ok = bool(np.all(np.isfinite(f))) and spread > 0
            p.check = f"reference: fitness mean {np.mean(f):+.6f}, std over members {spread:.3g}"
        else:
            diff = float(np.max(np.abs(f - f0)))
            ok = bool(np.all(np.isfinite(f))) and diff <= 1e-4 * scale
            p.check = f"max |f - f_esx| = {diff:.2e} (tolerance {1e-4 * scale:.1e})"
        p.ok = ok
        print(f"  check {p.case:<11} {p.name:<22} {'ok  ' if ok else 'FAIL'} {p.check}", file=out)
    for n in notes:
        print(f"  note: a MaterializeWarning was raised while tracing {ref.case}/{ref.framework}: {n}", file=out)


def compile_path(p: Path, key, options: dict | None = None) -> None:
    step = p.strategy.make_step(p.fitness)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.compiled = step.lower(p.state, key, p.data).compile(compiler_options=options or None)
    p.compile_s = time.perf_counter() - t0
    try:
        cost = p.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        p.gflop = float(cost.get("flops", float("nan"))) / 1e9
    except Exception:   # pragma: no cover - not every backend reports costs
        p.gflop = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p.eqns, p.dots = jaxpr_summary(lambda s: p.strategy.evaluate(s, p.fitness, key, p.data), p.state)
    p.state, _ = p.compiled(p.state, key, p.data)    # one untimed generation (first-run allocations)
    jax.block_until_ready(p.state)


def repeat_order(paths: list[Path], r: int) -> list[Path]:
    """The order of repeat ``r``: per framework its ``esx`` and ``interop`` paths next to each other, in the order
    A B on even repeats and B A on odd ones (so a linear drift cancels in their ratio), then the ``materialised``
    paths."""
    lowrank = [p for p in paths if p.kind != "materialised"]
    pairs: dict = {}
    for p in lowrank:
        pairs.setdefault(p.framework, []).append(p)
    order = [p for fw in pairs for p in (pairs[fw] if r % 2 == 0 else pairs[fw][::-1])]
    return order + [p for p in paths if p.kind == "materialised"]


def time_paths(paths: list[Path], generations: int, repeats: int, keys: list, settle: float) -> None:
    """``repeats`` rounds; in each, every path runs ``generations`` generations in turn (:func:`repeat_order`).

    After a ``materialised`` block the script sleeps ``settle`` seconds: on the 2-core CPU the program that ran
    right after one (which allocates and frees a full weight matrix per member, 3 GiB a generation for the MLP) was
    up to 1.7x slower for about a second, whichever program it was."""
    for r in range(repeats):
        for p in repeat_order(paths, r):
            state = p.state
            t0 = time.perf_counter()
            for g in range(generations):
                state, _ = p.compiled(state, keys[g], p.data)
            jax.block_until_ready(state)
            p.ms.append((time.perf_counter() - t0) * 1e3 / generations)
            p.state = state
            if p.kind == "materialised" and settle > 0:
                time.sleep(settle)


def _summary(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _ratios(num: Path, den: Path) -> dict | None:
    """Per-repeat ``ms(num) / ms(den)`` (= throughput of ``den`` relative to ``num``), summarised."""
    if not (num.ms and den.ms):
        return None
    return _summary([a / b for a, b in zip(num.ms, den.ms)])


def _fmt_range(s: dict | None, fmt: str) -> str:
    if s is None:
        return "-"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def _load_line(tag: str) -> tuple:
    load = os.getloadavg()
    return load, f"{tag}: load average (1/5/15 min) {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, " \
                 f"os.cpu_count() = {os.cpu_count()}"


def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: mlp,transformer")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated: linen,nnx,equinox")
    ap.add_argument("--population", type=int, default=256, help="MLP population (default 256)")
    ap.add_argument("--transformer-population", type=int, default=32, help="transformer population (default 32)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--noise-source", default="hash", help="esx noise_source (default hash, the fastest)")
    ap.add_argument("--generations", type=int, default=5, help="generations per timed repeat (default 5)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds to pause after each timed materialised block (default 1, 0 with --tiny; see "
                         "time_paths)")
    ap.add_argument("--tiny", action="store_true", help="small widths and populations (the smoke test)")
    ap.add_argument("--fast-compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the timed steps with XLA's backend optimisation level 0 (faster compiles, slower "
                         "programs; default: on with --tiny only)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    frameworks = [f for f in args.frameworks.split(",") if f]
    for c in cases:
        if c not in CASES:
            ap.error(f"--cases: {c!r}; valid: {', '.join(CASES)}")
    for f in frameworks:
        if f not in FRAMEWORKS:
            ap.error(f"--frameworks: {f!r}; valid: {', '.join(FRAMEWORKS)}")
    sz = TINY if args.tiny else Sizes()
    fast = args.tiny if args.fast_compile is None else args.fast_compile
    if args.settle is None:
        args.settle = 0.0 if args.tiny else 1.0
    options = {"xla_backend_optimization_level": 0} if fast else None
    pops = {"mlp": args.population, "transformer": args.transformer_population}
    if args.tiny:
        pops = {"mlp": min(args.population, 8), "transformer": min(args.transformer_population, 4)}

    versions = {"python": platform.python_version(), "jax": jax.__version__, "esx": esx.__version__}
    for mod in ("flax", "equinox", "optax"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:   # pragma: no cover
            versions[mod] = "not installed"
    dev = jax.devices()[0]
    device = f"{dev.platform} / {getattr(dev, 'device_kind', '?')} ({len(jax.devices())} device(s))"
    start_load, line = _load_line("start")
    argv_shown = list(argv if argv is not None else sys.argv[1:])
    print(f"interop benchmark: python scripts/interop_bench.py {' '.join(argv_shown)}".rstrip(), file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), file=out)
    print(f"platform: {platform.platform()}; device: {device}", file=out)
    print(line, file=out)
    warn_load = start_load[0] > (os.cpu_count() or 1)
    if warn_load:
        print(f"WARNING: the 1-min load at start ({start_load[0]:.2f}) exceeds 1 per core ({os.cpu_count()} cores): "
              "timings are unreliable; re-measure on a quiet machine", file=out)
    print(f"sizes: {'TINY ' if args.tiny else ''}{sz}; populations {pops}; rank {args.rank}, sigma {args.sigma}, "
          f"noise_source {args.noise_source!r}; {args.generations} generations x {args.repeats} interleaved repeats "
          f"(esx/interop adjacent, AB then BA; materialised after them, {args.settle:g} s pause after each)"
          f"{'; FAST COMPILE (XLA backend optimisation level 0): timings not representative' if fast else ''}",
          file=out)

    results, rc = [], 0
    all_paths: list[Path] = []
    key = jax.random.key(0)
    for case in cases:
        print(f"\n== {case} ==", file=out)
        case_paths: list[Path] = []
        for fw in frameworks:
            try:
                s = SETUPS[fw](case, sz, jax.random.key(0))
            except ImportError as e:
                print(f"  {fw}: skipped ({e})", file=out)
                continue
            strategy = esx.eggroll(population_size=pops[case], rank=args.rank, sigma=args.sigma,
                                   optimizer=optax.adam(1e-3), labels=s.labels, noise_source=args.noise_source)
            state = strategy.init(jax.random.key(1), s.params)      # same key: same noise for every path
            labs = jax.tree_util.tree_leaves(s.labels.tree if hasattr(s.labels, "tree") else s.labels)
            counts = {lab: labs.count(lab) for lab in sorted(set(labs))}
            print(f"  {fw}: labels {counts}", file=out)
            paths = [Path(case, fw, kind, s.fitness[kind], strategy, state, s.data) for kind in KINDS]
            check_paths(paths, out)
            case_paths += paths
        for p in case_paths:
            if not p.ok:
                rc = 1
                continue
            compile_path(p, key, options)
            print(f"  compiled {p.name:<22} in {p.compile_s:6.2f} s (trace + XLA); XLA cost {p.gflop:8.3f} GFLOP/gen; "
                  f"evaluate jaxpr {p.eqns} eqns", file=out)
        timed = [p for p in case_paths if p.ok]
        keys = list(jax.random.split(jax.random.key(7), args.generations))
        time_paths(timed, args.generations, args.repeats, keys, args.settle)
        all_paths += case_paths

    end_load, line = _load_line("end")
    # the table
    rows = []
    for p in all_paths:
        same = {q.kind: q for q in all_paths if q.case == p.case and q.framework == p.framework}
        vs_esx = _ratios(same["esx"], p) if p.kind != "esx" else None
        vs_mat = _ratios(same["materialised"], p) if p.kind != "materialised" else None
        rows.append((p, vs_esx, vs_mat))
        same_dots = None if p.kind == "esx" or not (p.ok and same["esx"].ok) else p.dots == same["esx"].dots
        results.append({
            "case": p.case, "framework": p.framework, "path": p.kind, "check_ok": p.ok, "check": p.check,
            "compile_s": p.compile_s, "xla_gflop_per_generation": p.gflop, "evaluate_jaxpr_eqns": p.eqns,
            "same_matmuls_as_esx": same_dots,
            "ms_per_generation": _summary(p.ms) if p.ms else None,
            "throughput_vs_esx": vs_esx, "throughput_vs_materialised": vs_mat})
    print("\nthroughput ratios: 'vs esx ops' = ms(esx hand-written) / ms(path) (>= 0.95 is the target for interop); "
          "'vs materialised' = ms(materialised) / ms(path) (> 1: faster than materialising); per repeat, then "
          "median (min–max)", file=out)
    header = ("case", "path", "ms/gen median (min–max)", "vs esx ops", "vs materialised", "compile s", "GFLOP/gen")
    table = []
    for p, vs_esx, vs_mat in rows:
        if not p.ok:
            table.append((p.case, p.name, "CHECK FAILED: not timed", "-", "-", "-", "-"))
            continue
        mark = ""
        if p.kind == "interop" and vs_esx is not None:
            mark = "  ok" if vs_esx["median"] >= TARGET else "  < 0.95"
        table.append((p.case, p.name, _fmt_range(_summary(p.ms), ".1f"), _fmt_range(vs_esx, ".2f") + mark,
                      _fmt_range(vs_mat, ".2f"), f"{p.compile_s:.1f}", f"{p.gflop:.3g}"))
    widths = [max(len(r[i]) for r in [header] + table) for i in range(len(header))]
    fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()   # noqa: E731
    print(fmt(header), file=out)
    print("-+-".join("-" * w for w in widths), file=out)
    for r in table:
        print(fmt(r), file=out)
    print("\njaxpr of strategy.evaluate vs the hand-written one (matmuls = dot_generals by operand shapes and "
          "dimension numbers):", file=out)
    for p in all_paths:
        ref = next(q for q in all_paths if q.case == p.case and q.framework == p.framework and q.kind == "esx")
        if p.kind == "esx" or not (p.ok and ref.ok):
            continue
        n_dots, n_ref = sum(p.dots.values()), sum(ref.dots.values())
        dots = (f"same matmuls ({n_dots} dot_generals)" if p.dots == ref.dots else
                f"different matmuls ({n_dots} vs {n_ref} dot_generals, "
                f"{sum((p.dots - ref.dots).values())} not in the hand-written program)")
        print(f"  {p.case:<11} {p.name:<22} {dots}; {p.eqns} vs {ref.eqns} equations; XLA {p.gflop:.2f} vs "
              f"{ref.gflop:.2f} GFLOP/gen", file=out)
    ran = sorted({f"{p.case}:{p.framework}" for p in all_paths})
    print(f"\npaths that ran: {', '.join(ran)} (each: esx, interop, materialised)", file=out)
    checks_ok = all(p.ok for p in all_paths)
    print(f"numerical check: {'passed' if checks_ok else 'FAILED'} for {sum(p.ok for p in all_paths)} / "
          f"{len(all_paths)} paths", file=out)
    print(line, file=out)
    if warn_load:
        print("WARNING: the machine was loaded at start (see above): the ratios are unreliable", file=out)
    if args.json:
        meta = {"argv": argv_shown, "versions": versions, "device": device,
                "platform": platform.platform(), "cpu_count": os.cpu_count(), "load_start": start_load,
                "load_end": end_load, "load_warning": warn_load, "sizes": dataclasses.asdict(sz), "tiny": args.tiny,
                "populations": pops, "rank": args.rank, "sigma": args.sigma, "noise_source": args.noise_source,
                "generations": args.generations, "repeats": args.repeats, "settle_s": args.settle, "target": TARGET,
                "fast_compile": fast}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "checks_ok": checks_ok}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
