"""esx.interop: Flax linen, Flax NNX and Equinox models run under esx unchanged (issue #21 items 1-4).

For each framework:
* member by member, the adapter's fitness equals the same model written with esx ops (esx.dense / esx.embed /
  esx.value on the same params, same strategy and keys) to 1e-6, and ``tell`` makes the same update;
* the population fitness never forms a per-member weight: a walk over the jaxpr of ``strategy.evaluate`` (into every
  sub-jaxpr) finds no intermediate holding a low-rank leaf's full shape next to the member (or pair) axis -- and the
  walk does catch a fitness that materialises with ``esx.value`` (the negative control);
* a layer without a low-rank rule (Conv, a custom matrix) is materialised: the result equals the materialised
  reference and exactly one warning names the leaves and their per-member cost;
* the default labels; and a small regression that really trains (slow).

Dimensions are picked pairwise distinct (population 22 -> 11 pairs; widths 5, 6, 7, 9, 13; heads 2, head size 4,
sequence 3, batch 2) so that a shape match in the walk can only be a materialised weight.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx
from esx.interop import _views

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")

import esx.interop.equinox as esx_eqx  # noqa: E402
import esx.interop.linen as esx_linen  # noqa: E402
import esx.interop.nnx as esx_nnx  # noqa: E402

N = 22            # members; 11 pairs
VOCAB, D, HEADS, HEAD, HID, SPLIT, OUT = 13, 6, 2, 4, 9, 5, 7
B, L = 2, 3
NOISE = "normal"


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _views.reset_warnings()
    yield
    _views.reset_warnings()


def _strategy(labels, rank=2):
    return esx.eggroll(population_size=N, rank=rank, sigma=0.1, optimizer=optax.sgd(0.5), labels=labels,
                       noise_source=NOISE)


def _materialised(view):
    return jax.tree_util.tree_map(esx.value, view, is_leaf=_views.is_view)


def _one_warning(strategy, state, fitness, reference, x, *others) -> str:
    """Runs :func:`_check_same` (and a second trace) and returns the text of the one MaterializeWarning it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check_same(strategy, state, fitness, reference, x, *others)
        jax.eval_shape(lambda s: strategy.evaluate(s, fitness, jax.random.key(4), x), state)   # traced again
    ours = [w for w in caught if issubclass(w.category, _views.MaterializeWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    return str(ours[0].message)


def _check_same(strategy, state, fitness, reference, data, *others, key=jax.random.key(3)):
    """Member-by-member fitness equal to 1e-6 and the same update from ``tell`` (one compile for everything:
    ``others`` are more fitness functions that must give the same values). Returns the fitness."""

    @jax.jit
    def run(state, key, data):
        fs = [strategy.evaluate(state, fn, key, data) for fn in (fitness, reference, *others)]
        new = jax.vmap(lambda f: strategy.tell(state, f)[0].params)(jnp.stack(fs[:2]))   # one tell, traced once
        return fs, jax.tree_util.tree_map(lambda x: x[0], new), jax.tree_util.tree_map(lambda x: x[1], new)

    fs, p1, p2 = run(state, key, data)
    f1 = fs[0]
    assert f1.shape == (N,) and bool(jnp.all(jnp.isfinite(f1)))
    for f in fs[1:]:
        np.testing.assert_allclose(np.asarray(f), np.asarray(f1), rtol=0, atol=1e-6)
    assert float(jnp.std(f1)) > 1e-4          # the members differ: the perturbation reaches the model
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(p1),
                                                           jax.tree_util.tree_leaves(state.params))]
    assert max(moved) > 0
    return f1


def _random_like(tree, seed=0):
    """Concrete values for an abstract parameter tree (``eval_shape``'s), drawn with numpy: no compilation.
    Floating matrices ``~ N(0, 1/fan_in)``; vectors ``0.1 N(0, 1)``, or ``1 + 0.1 N(0, 1)`` for scales and
    variances (leaves named ``scale`` / ``var`` / an Equinox norm's ``weight``); integer leaves 0; PRNG keys
    ``jax.random.key(seed)``. Other leaves are kept."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        if len(x.shape) >= 2:
            return jnp.asarray(rng.normal(size=x.shape) / math.sqrt(x.shape[0]), x.dtype)
        name = [p for p in esx.labels.path_to_str(path).split("/") if p != "value"][-1]
        centre = 1.0 if name in ("scale", "var", "weight") else 0.0
        return jnp.asarray(centre + 0.1 * rng.normal(size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(fill, tree)


# ---------------------------------------------------------------------------------------------------------------
# The jaxpr walk


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):                                     # a Jaxpr
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # a ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _shapes(jaxpr):
    """Every intermediate shape of ``jaxpr`` and of its sub-jaxprs (pjit, scan, while, cond, custom_jvp, ...)."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(getattr(v, "aval", None), "shape", None)
            if shape is not None:
                yield tuple(shape)
        for p in eqn.params.values():
            for sub in _sub_jaxprs(p):
                yield from _shapes(sub)


def _per_member_weights(jaxpr, weight_shapes, population=N):
    """The intermediates holding a full weight shape (its axes in any order) plus a member or pair axis."""
    found = []
    for shape in set(_shapes(jaxpr)):
        for w in weight_shapes:
            rest = list(shape)
            try:
                for d in w:
                    rest.remove(d)
            except ValueError:
                continue
            if population in rest or population // 2 in rest:
                found.append((shape, w))
    return found


def _lowrank_shapes(params, labels):
    if callable(labels) and not isinstance(labels, dict):
        labels = labels.tree
    labs = jax.tree_util.tree_leaves(labels)
    return {tuple(np.shape(p)) for p, lab in zip(jax.tree_util.tree_leaves(params), labs)
            if lab.startswith("lowrank")}


def _assert_lowrank_only(strategy, state, fitness, data, negative, weight_shapes):
    key = jax.random.key(5)
    jaxpr = jax.make_jaxpr(lambda s: strategy.evaluate(s, fitness, key, data))(state).jaxpr
    assert _per_member_weights(jaxpr, weight_shapes) == []
    bad = jax.make_jaxpr(lambda s: strategy.evaluate(s, negative, key, data))(state).jaxpr
    caught = _per_member_weights(bad, weight_shapes)
    assert {w for _, w in caught} == set(weight_shapes), caught   # the walk sees every materialised weight


def _attention(q, k, v):
    """softmax(q kᵀ / √d) v over ``[..., L, heads, d]`` (the frameworks' unmasked attention)."""
    logits = jnp.einsum("...qhd,...khd->...hqk", q / math.sqrt(q.shape[-1]), k)
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, axis=-1), v)


def _layer_norm(x, scale, bias, eps):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    return y * esx.value(scale) + esx.value(bias)


def _normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _tokens():
    ids = jnp.asarray(np.random.default_rng(7).integers(0, VOCAB, (B, L)), jnp.int32)
    return ids, _normal(8, B, L, VOCAB)


# ---------------------------------------------------------------------------------------------------------------
# Flax linen


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(VOCAB, D, name="embed")
        h = emb(ids)                                                                   # [B, L, D]
        h = h + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * HEAD, name="attn")(h)
        h = nn.LayerNorm(name="norm")(h)
        h = jnp.tanh(nn.Dense(HID, name="mlp")(h))                                     # [B, L, HID]
        h = jnp.tanh(nn.DenseGeneral((2, SPLIT), name="split")(h))                      # kernel [HID, 2, SPLIT]
        h = nn.DenseGeneral(D, axis=(-2, -1), name="merge")(h)                         # kernel [2, SPLIT, D]
        return emb.attend(h)                                                           # [B, L, VOCAB]


def _linen_reference(view, ids):
    p = view["params"]
    h = esx.embed(ids, p["embed"]["embedding"])
    a = p["attn"]
    q, k, v = (esx.dense(h, a[n]["kernel"]) + esx.value(a[n]["bias"]) for n in ("query", "key", "value"))
    h = h + esx.dense(_attention(q, k, v), a["out"]["kernel"]) + esx.value(a["out"]["bias"])
    h = _layer_norm(h, p["norm"]["scale"], p["norm"]["bias"], 1e-6)
    h = jnp.tanh(esx.dense(h, p["mlp"]["kernel"]) + esx.value(p["mlp"]["bias"]))
    h = jnp.tanh(esx.dense(h, p["split"]["kernel"]) + esx.value(p["split"]["bias"]))
    h = esx.dense(h, p["merge"]["kernel"]) + esx.value(p["merge"]["bias"])
    return esx.dense(h, p["embed"]["embedding"], layout="out_in")


def _linen_setup():
    model = LinenNet()
    ids, target = _tokens()
    variables = _random_like(jax.eval_shape(model.init, jax.random.key(0), ids))
    labels = esx_linen.labels(model, variables, ids)
    strategy = _strategy(labels)
    return model, variables, labels, strategy, strategy.init(jax.random.key(1), variables), (ids, target)


def test_linen_labels():
    model, variables, labels, *_ = _linen_setup()
    p = labels["params"]
    assert p["embed"] == {"embedding": "lowrank"}
    assert p["mlp"] == {"kernel": "lowrank", "bias": "full"}
    assert p["split"] == {"kernel": "lowrank:1", "bias": "full"}          # [HID, 2, SPLIT]: one matrix, 1 row axis
    assert p["merge"] == {"kernel": "lowrank:2", "bias": "full"}          # [2, SPLIT, D]: 2 row axes
    assert p["attn"]["query"] == {"kernel": "lowrank:1", "bias": "full"}  # bias [HEADS, HEAD] is full-rank
    assert p["attn"]["out"] == {"kernel": "lowrank:2", "bias": "full"}
    assert p["norm"] == {"scale": "full", "bias": "full"}

    class WithStats(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=True)(nn.Dense(5)(x))

    x = jnp.ones((2, 3))
    v = _random_like(jax.eval_shape(WithStats().init, jax.random.key(0), x))
    labs = esx_linen.labels(WithStats(), v, x)
    assert labs["batch_stats"]["BatchNorm_0"] == {"mean": "frozen", "var": "frozen"}
    assert labs["params"]["BatchNorm_0"] == {"scale": "full", "bias": "full"}
    dense = nn.Dense(5)
    assert esx_linen.labels(dense, _random_like(jax.eval_shape(dense.init, jax.random.key(0), x))["params"],
                            x) == {"kernel": "lowrank", "bias": "full"}
    over = esx_linen.labels(WithStats(), v, x, overrides={"params/Dense_0/*": "frozen"})
    assert over["params"]["Dense_0"] == {"kernel": "frozen", "bias": "frozen"}
    with pytest.raises(ValueError, match="match no parameter"):
        esx_linen.labels(WithStats(), v, x, overrides={"params/nothing": "frozen"})


def test_linen_matches_esx_ops_and_stays_lowrank():
    model, variables, labels, strategy, state, data = _linen_setup()

    def loss(out, target):
        return -jnp.mean((out - target) ** 2)

    def fitness(view, key, data):                     # the user's model.apply, unchanged
        ids, target = data
        with esx_linen.members():
            return loss(model.apply(view, ids), target)

    def reference(view, key, data):
        return loss(_linen_reference(view, data[0]), data[1])

    def negative(view, key, data):                    # materialised: what the walk must catch
        return loss(model.apply(_materialised(view), data[0]), data[1])

    with warnings.catch_warnings():
        warnings.simplefilter("error", _views.MaterializeWarning)     # nothing here is materialised
        _check_same(strategy, state, fitness, reference, data)
        _assert_lowrank_only(strategy, state, fitness, data, negative, _lowrank_shapes(variables, labels))
    assert nn.Module.apply is esx_linen._ORIG_APPLY                     # members() put Flax back
    with esx_linen.members():                                           # plain params: plain Flax
        out = jax.eval_shape(lambda p: model.apply(p, data[0]), state.params)
    assert out.shape == (B, L, VOCAB)


class LinenFallback(nn.Module):
    @nn.compact
    def __call__(self, x):                                            # x [B, L, D]
        h = nn.Conv(5, kernel_size=(2,), name="conv")(x)              # kernel [2, D, 5]: no low-rank rule
        w = self.param("w", nn.initializers.lecun_normal(), (5, OUT))  # a matrix of our own
        h = jnp.tanh(h @ w)                                          # [B, L, OUT]
        h = nn.DenseGeneral(4, axis=1, name="mix")(h)                # contracts L, not the last axis: low-rank
        h = nn.DenseGeneral(5, batch_dims=(0,), name="batched")(h)   # kernel [B, 4, 5]: batch_dims, no rule
        return nn.Dense(HID, name="head")(h)                         # [B, OUT, HID]


def test_linen_fallback_materialises_with_one_warning():
    model = LinenFallback()
    x = _normal(2, B, L, D)
    variables = _random_like(jax.eval_shape(model.init, jax.random.key(0), x))
    labels = esx_linen.labels(model, variables, x)
    assert labels["params"]["conv"]["kernel"] == "lowrank" and labels["params"]["w"] == "lowrank"
    strategy = _strategy(labels)
    state = strategy.init(jax.random.key(1), variables)

    def fitness(view, key, x):
        return -jnp.mean(esx_linen.apply(model, view, x) ** 2)

    def reference(view, key, x):
        return -jnp.mean(model.apply(_materialised(view), x) ** 2)

    def prepared(view, key, x):                       # esx.prepare's SplitLowRank leaves run the same
        return fitness(esx.prepare(view), key, x)

    msg = _one_warning(strategy, state, fitness, reference, x, prepared)
    assert "params/conv/kernel [2×6×5]" in msg and "params/w [5×7]" in msg and "params/batched/kernel [2×4×5]" in msg
    assert "params/head" not in msg and "params/mix" not in msg
    assert "240 B" in msg and "140 B" in msg and "160 B" in msg and "per member" in msg   # 60, 35, 40 float32
    assert "batch_dims" in msg and "read by Conv" in msg
    jaxpr = jax.make_jaxpr(lambda s: strategy.evaluate(s, fitness, jax.random.key(4), x))(state).jaxpr
    assert _per_member_weights(jaxpr, [(5, HID), (L, 4)]) == []         # Dense and DenseGeneral stay low-rank


# ---------------------------------------------------------------------------------------------------------------
# Flax NNX


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, qkv_features=HEADS * HEAD, decode=False,
                                           rngs=rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.bn = nnx.BatchNorm(D, use_running_average=True, rngs=rngs)
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.mlp = nnx.Linear(D, HID, rngs=rngs)
        self.split = nnx.LinearGeneral(HID, (2, SPLIT), rngs=rngs)
        self.merge = nnx.LinearGeneral((2, SPLIT), D, axis=(-2, -1), rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = self.norm(h + self.attn(h))
        h = self.drop(self.bn(h))
        h = jnp.tanh(self.mlp(h))
        h = jnp.tanh(self.split(h))
        return self.embed.attend(self.merge(h))


def _nnx_reference(view, rest, ids):
    p = view
    val = lambda var: var.get_value()   # noqa: E731  (the view's Param objects hold the member views)
    h = esx.embed(ids, val(p["embed"]["embedding"]))
    a = p["attn"]
    q, k, v = (esx.dense(h, val(a[n]["kernel"])) + esx.value(val(a[n]["bias"])) for n in ("query", "key", "value"))
    h = h + esx.dense(_attention(q, k, v), val(a["out"]["kernel"])) + esx.value(val(a["out"]["bias"]))
    h = _layer_norm(h, val(p["norm"]["scale"]), val(p["norm"]["bias"]), 1e-6)
    mean, var = rest["bn"]["mean"].get_value(), rest["bn"]["var"].get_value()
    h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * esx.value(val(p["bn"]["scale"])) + esx.value(val(p["bn"]["bias"]))
    h = jnp.tanh(esx.dense(h, val(p["mlp"]["kernel"])) + esx.value(val(p["mlp"]["bias"])))
    h = jnp.tanh(esx.dense(h, val(p["split"]["kernel"])) + esx.value(val(p["split"]["bias"])))
    h = esx.dense(h, val(p["merge"]["kernel"])) + esx.value(val(p["merge"]["bias"]))
    return esx.dense(h, val(p["embed"]["embedding"]), layout="out_in")


def _nnx_model(cls):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
    return nnx.merge(graphdef, _random_like(state))


def _nnx_setup():
    model = _nnx_model(NNXNet)
    # non-trivial batch statistics, so that the reference really reads them
    model.bn.mean.set_value(jnp.linspace(-0.5, 0.5, D))
    model.bn.var.set_value(jnp.linspace(0.5, 2.0, D))
    graphdef, params, rest = esx_nnx.split(model)
    labels = esx_nnx.labels(model)
    strategy = _strategy(labels)
    return model, graphdef, params, rest, labels, strategy, strategy.init(jax.random.key(1), params)


def test_nnx_labels_by_variable_type():
    model, graphdef, params, rest, labels, *_ = _nnx_setup()
    flat = dict(zip(esx.labels.leaf_paths(labels), jax.tree_util.tree_leaves(labels)))
    assert flat["mlp/kernel/value"] == "lowrank" and flat["mlp/bias/value"] == "full"
    assert flat["embed/embedding/value"] == "lowrank"
    assert flat["split/kernel/value"] == "lowrank:1" and flat["merge/kernel/value"] == "lowrank:2"
    assert flat["attn/query/kernel/value"] == "lowrank:1" and flat["attn/query/bias/value"] == "full"
    assert flat["attn/out/kernel/value"] == "lowrank:2"
    assert flat["norm/scale/value"] == flat["bn/scale/value"] == flat["bn/bias/value"] == "full"
    # batch statistics and RNG state are not parameters: split leaves them in `rest`, never perturbed ...
    assert set(esx.labels.leaf_paths(rest)) == {"bn/mean/value", "bn/var/value", "drop/rngs/count/value",
                                                "drop/rngs/key/value"}
    # ... and labelled frozen when a whole state is labelled
    whole = esx_nnx.labels(model, nnx.state(model))
    wflat = dict(zip(esx.labels.leaf_paths(whole), jax.tree_util.tree_leaves(whole)))
    for p in ("bn/mean/value", "bn/var/value", "drop/rngs/count/value", "drop/rngs/key/value"):
        assert wflat[p] == "frozen"
    assert wflat["mlp/kernel/value"] == "lowrank"
    over = esx_nnx.labels(model, overrides={"mlp/*": "frozen"})
    assert dict(zip(esx.labels.leaf_paths(over), jax.tree_util.tree_leaves(over)))["mlp/kernel/value"] == "frozen"


def test_nnx_matches_esx_ops_and_stays_lowrank():
    model, graphdef, params, rest, labels, strategy, state = _nnx_setup()
    ids, target = _tokens()

    def fitness(view, key, data):
        member = esx_nnx.merge(graphdef, view, rest)
        return -jnp.mean((member(data[0]) - data[1]) ** 2)

    def reference(view, key, data):
        return -jnp.mean((_nnx_reference(view, rest, data[0]) - data[1]) ** 2)

    def negative(view, key, data):
        return -jnp.mean((nnx.merge(graphdef, _materialised(view), rest)(data[0]) - data[1]) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error", _views.MaterializeWarning)
        _check_same(strategy, state, fitness, reference, (ids, target))
        _assert_lowrank_only(strategy, state, fitness, (ids, target), negative, _lowrank_shapes(params, labels))
    assert type(model.mlp) is nnx.Linear and type(model.split) is nnx.LinearGeneral   # the user's classes untouched
    trained = nnx.merge(graphdef, state.params, rest)
    assert type(trained.mlp) is nnx.Linear


class NNXFallback(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(D, 5, kernel_size=(2,), rngs=rngs)
        self.w = nnx.Param(jax.random.normal(rngs.params(), (5, OUT)) / 3)
        self.mix = nnx.LinearGeneral(L, 4, axis=1, rngs=rngs)                     # contracts L: low-rank
        self.batched = nnx.LinearGeneral(4, 5, batch_axis={0: B}, rngs=rngs)      # kernel [B, 4, 5]: no rule
        self.head = nnx.Linear(5, HID, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv(x) @ self.w[...])                                  # [B, L, OUT]
        return self.head(self.batched(self.mix(h)))


def test_nnx_fallback_materialises_with_one_warning():
    model = _nnx_model(NNXFallback)
    graphdef, params, rest = esx_nnx.split(model)
    strategy = _strategy(esx_nnx.labels(model))
    state = strategy.init(jax.random.key(1), params)
    x = _normal(2, B, L, D)

    def fitness(view, key, x):
        return -jnp.mean(esx_nnx.merge(graphdef, view, rest)(x) ** 2)

    def reference(view, key, x):
        return -jnp.mean(nnx.merge(graphdef, _materialised(view), rest)(x) ** 2)

    msg = _one_warning(strategy, state, fitness, reference, x)
    assert "conv/kernel [2×6×5]" in msg and "w [5×7]" in msg and "batched/kernel [2×4×5]" in msg
    assert "head" not in msg and "mix" not in msg and "240 B" in msg and "batch_axis" in msg
    jaxpr = jax.make_jaxpr(lambda s: strategy.evaluate(s, fitness, jax.random.key(4), x))(state).jaxpr
    assert _per_member_weights(jaxpr, [(5, HID), (L, 4)]) == []         # Linear and LinearGeneral stay low-rank


# ---------------------------------------------------------------------------------------------------------------
# Equinox


class EqxNet(eqx.Module):
    embed: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(VOCAB, D, key=k[0])
        self.attn = eqx.nn.MultiheadAttention(HEADS, D, qk_size=HEAD, vo_size=HEAD, use_query_bias=True,
                                              use_output_bias=True, key=k[1])
        self.norm = eqx.nn.LayerNorm(D)
        self.mlp = eqx.nn.MLP(D, VOCAB, HID, depth=2, activation=jnp.tanh, key=k[2])

    def __call__(self, ids):                                   # ids [L]: Equinox's one-example convention
        h = jax.vmap(self.embed)(ids)
        h = jax.vmap(self.norm)(h + self.attn(h, h, h))
        return jax.vmap(self.mlp)(h)


def _eqx_reference(view, ids):
    h = esx.embed(ids, view.embed.weight)                      # [B, L, D]
    a = view.attn

    def proj(lin, x):
        y = esx.dense(x, lin.weight, layout="out_in")
        y = y if lin.bias is None else y + esx.value(lin.bias)
        return y.reshape(*y.shape[:-1], HEADS, -1)

    o = _attention(proj(a.query_proj, h), proj(a.key_proj, h), proj(a.value_proj, h))
    o = esx.dense(o.reshape(*o.shape[:-2], -1), a.output_proj.weight, layout="out_in") + esx.value(a.output_proj.bias)
    h = _layer_norm(h + o, view.norm.weight, view.norm.bias, 1e-5)
    layers = view.mlp.layers
    for lin in layers[:-1]:
        h = jnp.tanh(esx.dense(h, lin.weight, layout="out_in") + esx.value(lin.bias))
    return esx.dense(h, layers[-1].weight, layout="out_in") + esx.value(layers[-1].bias)


def _eqx_model(cls):
    return _random_like(eqx.filter_eval_shape(cls, jax.random.key(0)))


def _eqx_setup():
    model = _eqx_model(EqxNet)
    params, static = esx_eqx.partition(model)
    labels = esx_eqx.labels(params)
    strategy = _strategy(labels)
    return model, params, static, labels, strategy, strategy.init(jax.random.key(1), params)


def test_eqx_labels_and_partition():
    model, params, static, labels, *_ = _eqx_setup()
    tree = labels.tree
    assert tree.embed.weight == "lowrank"
    assert tree.attn.query_proj.weight == "lowrank" and tree.attn.query_proj.bias == "full"
    assert [lin.weight for lin in tree.mlp.layers] == ["lowrank"] * 3
    assert [lin.bias for lin in tree.mlp.layers] == ["full"] * 3
    assert tree.norm.weight == "full" and tree.norm.bias == "full"
    leaves = jax.tree_util.tree_leaves(params)
    assert all(isinstance(x, jax.Array) for x in leaves)                # activations etc. filtered out
    assert len(jax.tree_util.tree_leaves(tree)) == len(leaves)
    with pytest.raises(TypeError, match="partition"):
        esx_eqx.labels(model)                                           # the whole model holds functions
    over = esx_eqx.labels(params, overrides={"mlp/layers/2/*": "frozen"})
    assert over.tree.mlp.layers[2].weight == "frozen" and over.tree.mlp.layers[1].weight == "lowrank"
    conv = esx_eqx.partition(_random_like(eqx.filter_eval_shape(eqx.nn.Conv1d, 2, 3, 2, key=jax.random.key(0))))
    conv = esx_eqx.labels(conv[0])
    assert conv.tree.weight == "lowrank" and conv.tree.bias == "full"   # Conv's bias is [out, 1]


def test_eqx_matches_esx_ops_and_stays_lowrank():
    model, params, static, labels, strategy, state = _eqx_setup()
    ids, target = _tokens()

    def fitness(view, key, data):
        member = esx_eqx.combine(view, static)
        return -jnp.mean((jax.vmap(member)(data[0]) - data[1]) ** 2)   # per-example vmap, Equinox's idiom

    def reference(view, key, data):
        return -jnp.mean((_eqx_reference(view, data[0]) - data[1]) ** 2)

    def negative(view, key, data):
        member = eqx.combine(_materialised(view), static)
        return -jnp.mean((jax.vmap(member)(data[0]) - data[1]) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("error", _views.MaterializeWarning)
        _check_same(strategy, state, fitness, reference, (ids, target))
        _assert_lowrank_only(strategy, state, fitness, (ids, target), negative, _lowrank_shapes(params, labels))
    member = esx_eqx.combine(state.params, static)                    # plain params: plain Equinox
    assert type(member.mlp.layers[0]) is eqx.nn.Linear


class EqxFallback(eqx.Module):
    conv: eqx.nn.Conv1d
    w: jax.Array
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.conv = eqx.nn.Conv1d(D, 5, 2, key=k[0])
        self.w = jax.random.normal(k[1], (OUT, 5)) / 3
        self.head = eqx.nn.Linear(OUT, HID, key=k[2])

    def __call__(self, x):                                     # x [L, D]
        h = self.conv(x.T).T                                   # [L - 1, 5]
        return jax.vmap(self.head)(jnp.tanh(h @ self.w.T))


def test_eqx_fallback_materialises_with_one_warning():
    params, static = esx_eqx.partition(_eqx_model(EqxFallback))
    strategy = _strategy(esx_eqx.labels(params))
    state = strategy.init(jax.random.key(1), params)
    x = _normal(2, B, L, D)

    def fitness(view, key, x):
        return -jnp.mean(jax.vmap(esx_eqx.combine(view, static))(x) ** 2)

    def reference(view, key, x):
        return -jnp.mean(jax.vmap(eqx.combine(_materialised(view), static))(x) ** 2)

    msg = _one_warning(strategy, state, fitness, reference, x)
    assert "conv/weight [5×6×2]" in msg and "w [7×5]" in msg and "head" not in msg and "240 B" in msg
    assert "read by Conv1d" in msg and "read by EqxFallback" in msg
    jaxpr = jax.make_jaxpr(lambda s: strategy.evaluate(s, fitness, jax.random.key(4), x))(state).jaxpr
    assert _per_member_weights(jaxpr, [(HID, OUT)]) == []               # the Linear head stays low-rank


# ---------------------------------------------------------------------------------------------------------------
# Training end to end: fit sin(2x) with an MLP of width 32


def _train(params, labels, fitness, generations=100):
    xs = jnp.linspace(-2.0, 2.0, 64)[:, None]
    data = (xs, jnp.sin(2 * xs))
    strategy = esx.eggroll(population_size=64, rank=2, sigma=0.05, optimizer=optax.adam(0.03), labels=labels)
    state = strategy.init(jax.random.key(1), params)
    step = jax.jit(lambda s, k: esx.step(strategy, s, fitness, k, data))
    first = None
    for g in range(generations):
        state, metrics = step(state, jax.random.key(100 + g))
        first = float(metrics.fitness_mean) if first is None else first
    return state, data, first


def test_linen_trains():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.tanh(nn.Dense(32)(x))
            x = jnp.tanh(nn.Dense(32)(x))
            return nn.Dense(1)(x)

    model = MLP()
    x0 = jnp.zeros((1, 1))
    variables = _random_like(jax.eval_shape(model.init, jax.random.key(0), x0))

    def fitness(view, key, data):
        with esx_linen.members():
            return -jnp.mean((model.apply(view, data[0]) - data[1]) ** 2)

    state, (xs, ys), _ = _train(variables, esx_linen.labels(model, variables, x0), fitness)
    start = float(jnp.mean((model.apply(variables, xs) - ys) ** 2))
    end = float(jnp.mean((model.apply(state.params, xs) - ys) ** 2))
    assert end < 0.1 * start, (start, end)       # about 0.01-0.03 of the start seen


def test_nnx_trains():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2, self.l3 = nnx.Linear(1, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs), \
                nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x):
            return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))

    model = _nnx_model(MLP)
    graphdef, params, rest = esx_nnx.split(model)

    def fitness(view, key, data):
        return -jnp.mean((esx_nnx.merge(graphdef, view, rest)(data[0]) - data[1]) ** 2)

    state, (xs, ys), _ = _train(params, esx_nnx.labels(model), fitness)
    start = float(jnp.mean((model(xs) - ys) ** 2))
    end = float(jnp.mean((nnx.merge(graphdef, state.params, rest)(xs) - ys) ** 2))
    assert end < 0.1 * start, (start, end)       # about 0.01-0.03 of the start seen


def test_eqx_trains():
    model = _random_like(eqx.filter_eval_shape(eqx.nn.MLP, 1, 1, 32, depth=2, activation=jnp.tanh,
                                               key=jax.random.key(0)))
    params, static = esx_eqx.partition(model)

    def fitness(view, key, data):
        return -jnp.mean((jax.vmap(esx_eqx.combine(view, static))(data[0]) - data[1]) ** 2)

    state, (xs, ys), _ = _train(params, esx_eqx.labels(params), fitness)
    start = float(jnp.mean((jax.vmap(model)(xs) - ys) ** 2))
    end = float(jnp.mean((jax.vmap(eqx.combine(state.params, static))(xs) - ys) ** 2))
    assert end < 0.1 * start, (start, end)       # about 0.01-0.03 of the start seen


def test_adapters_change_neither_your_classes_nor_flax():
    """docs/interop.md: ``members()`` restores ``nn.Module.apply`` (also after an error), ``merge`` / ``combine`` swap
    layer classes on the fresh module only, and a plain ``nnx.merge`` afterwards is plain NNX."""
    original = nn.Module.apply
    with pytest.raises(RuntimeError, match="inside"):
        with esx_linen.members():
            assert nn.Module.apply is not original
            raise RuntimeError("inside")
    assert nn.Module.apply is original

    model, graphdef, params, rest, labels, strategy, state = _nnx_setup()
    linear_call = nnx.Linear.__call__
    view = strategy.view(state, strategy.ask(state), 0)
    member = esx_nnx.merge(graphdef, view, rest)
    assert isinstance(member.mlp, nnx.Linear) and type(member.mlp) is not nnx.Linear   # a subclass, on the member
    assert type(model.mlp) is nnx.Linear and nnx.Linear.__call__ is linear_call
    assert type(nnx.merge(graphdef, state.params, rest).mlp) is nnx.Linear

    mlp = eqx.nn.MLP(2, 2, width_size=4, depth=1, key=jax.random.key(0))
    p, static = esx_eqx.partition(mlp)
    s = _strategy(esx_eqx.labels(p))
    st = s.init(jax.random.key(1), p)
    swapped = esx_eqx.combine(s.view(st, s.ask(st), 0), static)
    assert isinstance(swapped.layers[0], eqx.nn.Linear) and type(swapped.layers[0]) is not eqx.nn.Linear
    assert type(mlp.layers[0]) is eqx.nn.Linear and type(eqx.combine(st.params, static).layers[0]) is eqx.nn.Linear


def test_out_of_range_ids_clamp_in_esx_embed():
    """docs/interop.md, Limits: an id past the table reads the last row in ``esx.embed`` (JAX's gather clamps)."""
    table = jnp.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(esx.embed(jnp.array([5, 3]), table), table[jnp.array([3, 3])])


# ---------------------------------------------------------------------------------------------------------------
# docs/interop.md: "a subclass that overrides __call__, a layer with a custom dot_general" are materialised (with the
# warning naming why), so the user's code runs, not the adapter's low-rank call

def _scaled_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    return 3.0 * jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                     preferred_element_type=preferred_element_type)


class DoubledDense(nn.Dense):
    def __call__(self, x):
        return 2.0 * super().__call__(x)


class LinenOverrides(nn.Module):
    @nn.compact
    def __call__(self, x):                                            # x [B, L, D]
        h = jnp.tanh(DoubledDense(5, name="doubled")(x))
        h = jnp.tanh(nn.Dense(4, dot_general=_scaled_dot_general, name="custom")(h))
        return nn.Dense(HID, name="head")(h)


def test_linen_overridden_call_and_custom_dot_general_are_materialised():
    model = LinenOverrides()
    x = _normal(2, B, L, D)
    variables = _random_like(jax.eval_shape(model.init, jax.random.key(0), x))
    strategy = _strategy(esx_linen.labels(model, variables, x))
    state = strategy.init(jax.random.key(1), variables)

    def fitness(view, key, x):
        return -jnp.mean(esx_linen.apply(model, view, x) ** 2)

    def reference(view, key, x):
        return -jnp.mean(model.apply(_materialised(view), x) ** 2)

    def ignoring_the_override(view, key, x):   # what the adapter would compute with the library's own Dense
        return -jnp.mean(LinenPlain().apply(_materialised(view), x) ** 2)

    msg = _one_warning(strategy, state, fitness, reference, x)
    assert "params/doubled/kernel" in msg and "overrides Dense.__call__" in msg
    assert "params/custom/kernel" in msg and "custom dot_general" in msg and "params/head" not in msg
    f = strategy.evaluate(state, fitness, jax.random.key(3), x)
    assert not np.allclose(f, strategy.evaluate(state, ignoring_the_override, jax.random.key(3), x), rtol=1e-3)


class LinenPlain(nn.Module):
    """LinenOverrides with the library's Dense everywhere (the same parameter names)."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5, name="doubled")(x))
        h = jnp.tanh(nn.Dense(4, name="custom")(h))
        return nn.Dense(HID, name="head")(h)


class DoubledLinear(nnx.Linear):
    def __call__(self, x):
        return 2.0 * super().__call__(x)


class NNXOverrides(nnx.Module):
    def __init__(self, rngs):
        self.doubled = DoubledLinear(D, 5, rngs=rngs)
        self.custom = nnx.Linear(5, 4, dot_general=_scaled_dot_general, rngs=rngs)
        self.head = nnx.Linear(4, HID, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.custom(jnp.tanh(self.doubled(x)))))


def test_nnx_overridden_call_and_custom_dot_general_are_materialised():
    model = _nnx_model(NNXOverrides)
    graphdef, params, rest = esx_nnx.split(model)
    strategy = _strategy(esx_nnx.labels(model))
    state = strategy.init(jax.random.key(1), params)
    x = _normal(2, B, L, D)

    def fitness(view, key, x):
        return -jnp.mean(esx_nnx.merge(graphdef, view, rest)(x) ** 2)

    def reference(view, key, x):
        return -jnp.mean(nnx.merge(graphdef, _materialised(view), rest)(x) ** 2)

    msg = _one_warning(strategy, state, fitness, reference, x)
    assert "doubled/kernel" in msg and "overrides Linear.__call__" in msg
    assert "custom/kernel" in msg and "custom dot_general" in msg and "head" not in msg


class DoubledEqxLinear(eqx.nn.Linear):
    def __call__(self, x, *, key=None):
        return 2.0 * super().__call__(x, key=key)


class EqxOverrides(eqx.Module):
    doubled: DoubledEqxLinear
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key)
        self.doubled = DoubledEqxLinear(D, 5, key=k[0])
        self.head = eqx.nn.Linear(5, HID, key=k[1])

    def __call__(self, x):                                     # x [L, D]
        return jax.vmap(lambda r: self.head(jnp.tanh(self.doubled(r))))(x)


def test_eqx_overridden_call_is_materialised():
    params, static = esx_eqx.partition(_eqx_model(EqxOverrides))
    strategy = _strategy(esx_eqx.labels(params))
    state = strategy.init(jax.random.key(1), params)
    x = _normal(2, B, L, D)

    def fitness(view, key, x):
        return -jnp.mean(jax.vmap(esx_eqx.combine(view, static))(x) ** 2)

    def reference(view, key, x):
        return -jnp.mean(jax.vmap(eqx.combine(_materialised(view), static))(x) ** 2)

    msg = _one_warning(strategy, state, fitness, reference, x)
    assert "doubled/weight" in msg and "overrides __call__" in msg and "head" not in msg
