"""Equinox models under esx, unchanged: partition the model into its arrays (the esx parameters) and the rest, and
combine each member's view back into a model whose ``eqx.nn.Linear`` / ``eqx.nn.Embedding`` layers (inside
``eqx.nn.MLP``, ``eqx.nn.MultiheadAttention`` or your own modules) run low-rank, never forming a member's weight::

    import esx, esx.interop.equinox as esx_eqx

    model = eqx.nn.MLP(1, 1, width_size=32, depth=2, key=jax.random.key(0))
    params, static = esx_eqx.partition(model)              # arrays / everything else (activations, sizes)
    strategy = esx.eggroll(population_size=128, sigma=0.05, optimizer=optax.adam(1e-2), rank=4,
                           labels=esx_eqx.labels(params))
    state = strategy.init(jax.random.key(1), params)

    def fitness(view, key, batch):
        member = esx_eqx.combine(view, static)               # the model, as Equinox code calls it
        pred = jax.vmap(member)(batch["x"])                  # the per-sample idiom stays low-rank
        return -jnp.mean((pred - batch["y"]) ** 2)

    state, metrics = esx.step(strategy, state, fitness, key, batch)
    trained = eqx.combine(state.params, static)              # plain arrays: plain Equinox

**What runs how.** :func:`combine` is ``eqx.combine`` (with member views kept whole) followed by a tree surgery on
the result: each ``eqx.nn.Linear`` / ``eqx.nn.Embedding`` whose weight is a low-rank view is replaced by an instance
of a subclass of its class (``isinstance`` checks still hold; same fields) whose ``__call__`` is ``esx.dense(x, W,
layout="out_in") + b`` (``weight [out, in]``; ``"scalar"`` features and batched ``x [..., in]`` work) or
``esx.embed(i, W)``; a one-row input (Equinox's ``jax.vmap(model)(xs)``) takes esx's one-row path, still low-rank.
Full-rank leaves become plain arrays; low-rank leaves no supported layer reads (``eqx.nn.Conv``, an array field of
your own, a ``Linear`` subclass that overrides ``__call__``) are materialised per member with one
:class:`MaterializeWarning` naming them and their cost.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from esx import labels as labels_lib
from esx import ops
from esx.interop import _views
from esx.interop._views import MaterializeWarning

__all__ = ["MaterializeWarning", "SUPPORTED", "Labels", "combine", "labels", "partition"]

ADAPTER = "esx.interop.equinox"
SUPPORTED = (eqx.nn.Linear, eqx.nn.Embedding)
"""The layer classes that run low-rank (subclasses too, unless they override ``__call__``)."""


def partition(model: Any) -> tuple[Any, Any]:
    """``(params, static)``: ``eqx.partition(model, eqx.is_array)``. ``params`` (the model's arrays, ``None``
    elsewhere; leaf paths such as ``"layers/0/weight"``) is what the strategy evolves; ``static`` holds the rest
    (activation functions, sizes, flags)."""
    return eqx.partition(model, eqx.is_array)


def _base(layer: Any) -> type | None:
    for base in SUPPORTED:
        if isinstance(layer, base):
            return base
    return None


def _supported(layer: Any) -> bool:
    """Whether ``layer`` (a ``Linear`` / ``Embedding`` instance) keeps the library's ``__call__``."""
    base = _base(layer)
    cls = getattr(type(layer), "_esx_original", type(layer))
    return base is not None and cls.__call__ is base.__call__


def _is_node(x: Any) -> bool:
    return _views.is_view(x) or isinstance(x, SUPPORTED)


def _linear_call(self, x, *, key=None):
    if self.in_features == "scalar":
        if jnp.shape(x) != ():
            raise ValueError("x must have scalar shape")
        x = jnp.broadcast_to(x, (1,))
    dtype = _views.result_dtype(x, self.weight)
    y = ops.dense(jnp.asarray(x, dtype), self.weight, layout="out_in")
    if self.bias is not None:
        y = y + self.bias
    if self.out_features == "scalar":
        y = jnp.squeeze(y, -1)
    return y


def _embedding_call(self, x, *, key=None):
    if jnp.shape(x) != ():
        raise ValueError("`eqx.nn.Embedding()(x)` should be called with a scalar index `x`. "
                         "Use `jax.vmap` if you would like to index with multiple values.")
    return ops.embed(x, self.weight)


_LOWRANK_CLASSES: dict = {}


def _lowrank_class(cls: type) -> type:
    """A subclass of ``cls`` (``eqx.nn.Linear`` / ``Embedding`` or a subclass keeping its ``__call__``) whose
    ``__call__`` runs the low-rank view; made once per class."""
    if cls not in _LOWRANK_CLASSES:
        call = _embedding_call if issubclass(cls, eqx.nn.Embedding) else _linear_call
        _LOWRANK_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__call__": call, "_esx_original": cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _LOWRANK_CLASSES[cls]


def _rebuild(layer: Any, cls: type, **fields) -> Any:
    """An instance of ``cls`` with ``layer``'s fields (as ``jax.tree_util`` unflattening builds modules)."""
    new = object.__new__(cls)
    for f in dataclasses.fields(layer):
        object.__setattr__(new, f.name, fields.get(f.name, getattr(layer, f.name)))
    return new


def _modules(node: Any, prefix: tuple = ()):
    """``(path, module)`` for every Equinox module in ``node`` (paths ``/``-joined as esx writes them)."""
    if isinstance(node, eqx.Module):
        yield "/".join(map(str, prefix)), node
        for f in dataclasses.fields(node):
            yield from _modules(getattr(node, f.name, None), prefix + (f.name,))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _modules(v, prefix + (i,))
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _modules(v, prefix + (k,))


def combine(view: Any, static: Any) -> Any:
    """The model of one member: ``eqx.combine(view, static)`` with its ``Linear`` / ``Embedding`` layers running
    low-rank views low-rank (see the module docstring); full-rank leaves as plain arrays, other low-rank leaves
    materialised with the warning.

    Args:
      view: the member view a fitness receives (``params`` from :func:`partition` with member views as leaves), or
        plain params (then this is ``eqx.combine``).
      static: from :func:`partition`.

    Returns:
      the model (same classes, up to the low-rank layer subclasses), callable as usual.
    """
    model = eqx.combine(view, static, is_leaf=_views.is_view)
    if not _views.has_views(view):
        return model
    dropped, why = [], {}
    owners = None

    def fix(path, node):
        nonlocal owners
        name = labels_lib.path_to_str(path)
        if _views.is_view(node):
            if _views.is_lowrank(node):
                if owners is None:
                    owners = {p: type(m).__name__ for p, m in _modules(model)}
                dropped.append((name, node))
                why[name] = f"read by {owners.get(name.rpartition('/')[0], 'your code')}"
            return ops.value(node)
        if not isinstance(node, SUPPORTED):
            return node
        weight = node.weight
        fields = {f: _views.value_or_none(getattr(node, f)) for f in ("bias",) if hasattr(node, f)}
        if _supported(node) and _views.view_rows(weight) == 1:
            cls = _lowrank_class(getattr(type(node), "_esx_original", type(node)))
            return _rebuild(node, cls, **fields)
        if _views.is_lowrank(weight):
            dropped.append((f"{name}/weight", weight))
            why[f"{name}/weight"] = (f"{type(node).__name__} overrides __call__" if not _supported(node)
                                     else "a stack of matrices")
        return _rebuild(node, type(node), weight=ops.value(weight), **fields)

    model = jax.tree_util.tree_map_with_path(fix, model, is_leaf=_is_node)
    _views.warn_materialized(ADAPTER, dropped, why)
    return model


def labels(params: Any, *, overrides: Any = None) -> Any:
    """The esx label tree for ``params`` (from :func:`partition`, or any Equinox module of arrays):

    * weights of ``eqx.nn.Linear`` and ``eqx.nn.Embedding`` (also inside ``MLP``, ``MultiheadAttention`` or your
      modules): ``"lowrank"``; their biases ``"full"``;
    * other floating arrays: ``"full"`` for fields named ``bias`` (a ``Conv`` bias is ``[out, 1, ...]``), else
      esx's default (``"lowrank"`` for ``ndim >= 2``, run materialised with the warning;
      ``"full"`` otherwise); non-floating arrays: ``"frozen"``.

    Non-array leaves (activation functions, ...) must not be in ``params``: :func:`partition` filters them out.

    Args:
      params: the parameter pytree.
      overrides: ``{glob on the /-joined path: label}`` on top (``{"layers/2/*": "frozen"}``); first match wins,
        a pattern that matches nothing is an error.

    Returns:
      a :class:`Labels`: pass it as ``labels=`` to :func:`esx.eggroll`; ``.tree`` is the label tree.
    """
    special: dict[str, str] = {}
    for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, SUPPORTED))[0]:
        if isinstance(node, SUPPORTED):
            name = labels_lib.path_to_str(path)
            if _supported(node) and np.ndim(node.weight) == 2:
                special[f"{name}/weight"] = labels_lib.LOWRANK
            special[f"{name}/bias"] = labels_lib.FULL
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths, labs = [], []
    for path, leaf in flat:
        p = labels_lib.path_to_str(path)
        if not eqx.is_array(leaf):
            raise TypeError(f"labels: leaf {p!r} is not an array ({type(leaf).__name__}); pass the params of "
                            "esx.interop.equinox.partition(model), not the whole model")
        lab = _views.default_label(leaf)
        if lab != labels_lib.FROZEN and p in special:
            lab = special[p]
        elif lab != labels_lib.FROZEN and p.rpartition("/")[2] == "bias":   # e.g. Conv's bias [out, 1, ...]
            lab = labels_lib.FULL
        paths.append(p)
        labs.append(lab)
    labs = _views.apply_overrides(paths, labs, overrides)
    return Labels(jax.tree_util.tree_unflatten(treedef, labs), dict(zip(paths, labs)))


class Labels:
    """The labels of an Equinox parameter tree, as esx's ``labels=`` takes them: a labeller ``(path, leaf) ->
    label``. (The label tree itself, :attr:`tree`, is an instance of your module class and therefore callable, which
    esx would take for a labeller function.)

    Attributes:
      tree: the label tree, shaped like ``params`` (string leaves).
      by_path: ``{path: label}``.
    """

    def __init__(self, tree: Any, by_path: dict):
        self.tree = tree
        self.by_path = by_path

    def __call__(self, path: str, leaf: Any) -> str:
        if path not in self.by_path:
            raise ValueError(f"labels: no label for leaf {path!r}; these labels are for the paths "
                             f"{list(self.by_path)}")
        return self.by_path[path]

    def __repr__(self) -> str:
        return f"Labels({self.by_path})"
