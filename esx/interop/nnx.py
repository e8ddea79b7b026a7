"""Flax NNX models under esx, unchanged: split the model once, let esx evolve its ``nnx.Param`` state, and rebuild a
callable module per member whose ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Embed`` layers (and what is built
from them, such as ``nnx.MultiHeadAttention``) run low-rank, never forming a member's weight matrix::

    import esx, esx.interop.nnx as esx_nnx

    model = MyModel(rngs=nnx.Rngs(0))
    graphdef, params, rest = esx_nnx.split(model)      # params: nnx.Param state; rest: batch stats, RNG state, ...
    strategy = esx.eggroll(population_size=128, sigma=0.05, optimizer=optax.adam(1e-2), rank=4,
                           labels=esx_nnx.labels(model))
    state = strategy.init(jax.random.key(1), params)

    def fitness(view, key, batch):
        member = esx_nnx.merge(graphdef, view, rest)    # the model's own class, called as usual
        return -jnp.mean((member(batch["x"]) - batch["y"]) ** 2)

    state, metrics = esx.step(strategy, state, fitness, key, batch)
    trained = nnx.merge(graphdef, state.params, rest)   # plain arrays: plain NNX

**What runs how.** :func:`merge` calls ``nnx.merge`` and then, on the fresh module it returns (never on your
classes): each supported layer instance gets a subclass of its own class whose ``__call__`` (and ``Embed.attend``)
reads the kernel with ``get_value()`` and runs it with :func:`esx.dense` / :func:`esx.embed`; full-rank leaves become
plain arrays; low-rank leaves that no supported layer reads (``nnx.Conv``, ``nnx.Einsum``, a ``nnx.Param`` matrix of
your own, a ``LinearGeneral`` with ``batch_axis``, a subclass overriding ``__call__``, a custom ``dot_general``) are
materialised per member with one :class:`MaterializeWarning` naming them and their cost.

* ``nnx.Linear`` -- ``kernel [in, out]``, label ``"lowrank"``;
* ``nnx.LinearGeneral`` without ``batch_axis`` -- ``kernel [*in_features, *out_features]`` as one matrix over the
  contracted ``axis``: ``"lowrank"`` when 2-D, else ``"lowrank:k"`` with ``k = len(in_features)`` (attention's
  query/key/value ``[d, heads, head_dim]`` -> ``"lowrank:1"``, its output ``[heads, head_dim, d]`` -> ``"lowrank:2"``);
* ``nnx.Embed`` -- ``embedding [vocab, dim]``, ``"lowrank"``, for lookups and ``attend``.

``dtype`` and ``use_bias`` are honoured; ``precision``, ``preferred_element_type`` and ``out_sharding`` are not used
on the low-rank path. ``rest`` (everything but ``nnx.Param``) is never perturbed: a member may update its copy (batch
statistics, RNG counts) but the update is not kept.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from esx import labels as labels_lib
from esx import ops
from esx.interop import _views
from esx.interop._views import MaterializeWarning

__all__ = ["MaterializeWarning", "SUPPORTED", "labels", "merge", "split"]

ADAPTER = "esx.interop.nnx"
SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Embed)
"""The layer classes that run low-rank (subclasses too, unless they override ``__call__`` / ``attend``)."""


def split(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
    """``(graphdef, params, rest)``: ``nnx.split(model, nnx.Param, ...)``.

    ``params`` (an ``nnx.State`` of the ``nnx.Param`` variables, leaf paths such as ``"layers/0/kernel/value"``) is
    what the strategy evolves; ``rest`` (batch statistics, RNG state, caches, ...) stays as it is."""
    return nnx.split(model, nnx.Param, ...)


def _rule(mod: Any) -> tuple[int | None, str]:
    """``(k, why)``: the number of kernel axes ``mod`` contracts when it can run low-rank, else ``(None, reason)``."""
    for base in SUPPORTED:
        if isinstance(mod, base):
            break
    else:
        return None, f"{type(mod).__name__} has no low-rank rule"
    cls = getattr(type(mod), "_esx_original", type(mod))
    methods = ("__call__", "attend") if base is nnx.Embed else ("__call__",)
    for m in methods:
        if getattr(cls, m) is not getattr(base, m):
            return None, f"{cls.__name__} overrides {base.__name__}.{m}"
    if base is nnx.Embed:
        return 1, ""
    if base is nnx.Linear:
        if mod.dot_general is not lax.dot_general:
            return None, f"{cls.__name__} has a custom dot_general"
        return 1, ""
    if mod.dot_general is not None or mod.dot_general_cls is not None:
        return None, f"{cls.__name__} has a custom dot_general"
    if mod.batch_axis:
        return None, "nnx.LinearGeneral with batch_axis"
    return len(mod.in_features), ""


def _kernel_var(mod: Any) -> Any:
    return mod.embedding if isinstance(mod, nnx.Embed) else mod.kernel


def _get(var: Any) -> Any:
    return None if var is None else var.get_value()


def _linear_call(self, inputs, out_sharding=None):
    kernel = _get(self.kernel)
    if not _views.is_lowrank(kernel):
        return self._esx_original.__call__(self, inputs, out_sharding)
    bias = _get(self.bias)
    dtype = self.dtype if self.dtype is not None else _views.result_dtype(inputs, kernel, bias)
    x, kernel, bias = jnp.asarray(inputs, dtype), _views.cast(kernel, dtype), _views.cast(bias, dtype)
    if isinstance(self, nnx.Linear):
        y = ops.dense(x, kernel)
    else:
        y = _views.dense_general(x, kernel, self.axis)
    return y if bias is None else y + bias


def _embed_call(self, inputs, out_sharding=None):
    table = _get(self.embedding)
    if not _views.is_lowrank(table):
        return self._esx_original.__call__(self, inputs, out_sharding)
    return _views.embed_lookup(inputs, table, self.dtype, self.num_embeddings)


def _embed_attend(self, query, out_sharding=None):
    table = _get(self.embedding)
    if not _views.is_lowrank(table):
        return self._esx_original.attend(self, query, out_sharding)
    dtype = self.dtype if self.dtype is not None else _views.result_dtype(query, table)
    return ops.dense(jnp.asarray(query, dtype), _views.cast(table, dtype), layout="out_in")


_LOWRANK_CLASSES: dict = {}


def _lowrank_class(cls: type) -> type:
    """A subclass of the layer class ``cls`` whose ``__call__`` (and ``attend``) run low-rank views low-rank (and
    plain kernels as ``cls`` does); made once per class."""
    if cls not in _LOWRANK_CLASSES:
        methods = {"__call__": _embed_call, "attend": _embed_attend} if issubclass(cls, nnx.Embed) else \
            {"__call__": _linear_call}
        sub = type(cls.__name__, (cls,), {**methods, "_esx_original": cls, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _LOWRANK_CLASSES[cls] = sub
    return _LOWRANK_CLASSES[cls]


def _layers(module: nnx.Module):
    """``[(path, layer, k, why)]`` for every supported-layer instance in the graph of ``module``, and
    ``{id(kernel variable): (path, k, why)}``."""
    layers, kernels = [], {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, SUPPORTED):
            k, why = _rule(node)
            var = _kernel_var(node)
            name = "/".join(map(str, path))
            layers.append((name, node, k, why))
            prev = kernels.get(id(var))
            if prev is not None and prev[1] != k:
                k, why = None, "read by two layers"
            kernels[id(var)] = (name, k, why)
    return layers, kernels


def merge(graphdef: Any, view: Any, rest: Any = None) -> nnx.Module:
    """The module of one member: ``nnx.merge(graphdef, view, rest)`` whose supported layers run low-rank.

    Args:
      graphdef, rest: from :func:`split`.
      view: the member view a fitness receives (``params`` with :class:`esx.LowRank` / :class:`esx.Full` values),
        or plain params (then this is ``nnx.merge``).

    Returns:
      a module of your model's class; call it as usual. It is a fresh object per call (``nnx.merge``'s), so
      the changes described in the module docstring never reach ``graphdef`` or another module.
    """
    module = nnx.merge(graphdef, view, rest) if rest is not None else nnx.merge(graphdef, view)
    if not _views.has_views(view):
        return module
    layers, kernels = _layers(module)
    dropped, why = [], {}
    nodes = dict(nnx.iter_graph(module))
    for path, var in nodes.items():
        if not isinstance(var, nnx.Variable):
            continue
        value = var.get_value()
        if isinstance(value, ops.Full):
            var.set_value(ops.value(value))
        elif _views.is_lowrank(value):
            info = kernels.get(id(var))
            if info is None or info[1] is None or _views.view_rows(value) != info[1]:
                name = "/".join(map(str, path))
                if info is None:
                    why[name] = f"read by {type(nodes.get(tuple(path[:-1]))).__name__}"
                elif info[1] is None:
                    why[name] = info[2]
                else:
                    why[name] = (f"a stack of matrices, not the one matrix {info[0]} reads: "
                                 f"label it {_views.lowrank_label(info[1], value.ndim)!r}")
                dropped.append((name, value))
                var.set_value(ops.value(value))
    for _, layer, k, _ in layers:
        if k is not None and _views.is_lowrank(_kernel_var(layer).get_value()):
            layer.__class__ = _lowrank_class(getattr(type(layer), "_esx_original", type(layer)))
    _views.warn_materialized(ADAPTER, dropped, why)
    return module


def labels(model: nnx.Module, state: Any = None, *, overrides: Any = None) -> Any:
    """The esx label tree for ``state`` (default: the ``params`` of :func:`split`), by variable type and layer:

    * ``nnx.Param`` kernels of ``nnx.Linear`` / ``nnx.Embed`` and 2-D ``nnx.LinearGeneral`` kernels: ``"lowrank"``;
      N-D ``nnx.LinearGeneral`` kernels: ``"lowrank:k"`` (``k = len(in_features)``); their biases ``"full"``;
    * other floating ``nnx.Param`` leaves: esx's default (``"lowrank"`` for ``ndim >= 2``, run materialised with the
      warning; ``"full"`` for biases, norm scales and other vectors);
    * every other variable type (``nnx.BatchStat``, RNG keys and counts, caches, ...) and non-floating leaves:
      ``"frozen"``.

    Args:
      model: the NNX module.
      state: an ``nnx.State`` of ``model``'s variables (e.g. ``nnx.state(model)``); default ``split(model)[1]``.
      overrides: ``{glob on the /-joined leaf path: label}`` on top (paths end in ``/value``:
        ``{"head/*": "frozen"}``); first match wins, a pattern that matches nothing is an error.

    Returns:
      a tree shaped like ``state`` whose leaves are label strings.
    """
    if state is None:
        state = split(model)[1]
    _, kernels = _layers(model)
    by_path: dict[str, tuple[Any, int | None]] = {}
    biases: set = set()
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            info = kernels.get(id(var))
            by_path["/".join(map(str, path))] = (var, None if info is None else info[1])
    for _, layer, _, _ in _layers(model)[0]:   # a supported layer's bias is full-rank whatever its shape
        bias = getattr(layer, "bias", None)
        if isinstance(bias, nnx.Variable):
            biases.add(id(bias))
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    paths, labs = [], []
    for path, leaf in flat:
        p = labels_lib.path_to_str(path)
        var_path = p[:-len("/value")] if p.endswith("/value") else p
        var, k = by_path.get(var_path, (None, None))
        if var is None or not isinstance(var, nnx.Param) or _views.default_label(leaf) == labels_lib.FROZEN:
            lab = labels_lib.FROZEN
        elif k is not None:
            lab = _views.lowrank_label(k, np.ndim(leaf))
        elif id(var) in biases:
            lab = labels_lib.FULL
        else:
            lab = _views.default_label(leaf)
        paths.append(p)
        labs.append(lab)
    labs = _views.apply_overrides(paths, labs, overrides)
    return jax.tree_util.tree_unflatten(treedef, labs)
