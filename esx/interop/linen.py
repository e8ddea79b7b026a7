"""Flax linen models under esx, unchanged: ``model.init``'s variables are the esx parameters, ``model.apply`` runs
each member with ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Embed`` (and what is built from them, such as
``nn.MultiHeadDotProductAttention``) low-rank, never forming a member's weight matrix::

    import esx, esx.interop.linen as esx_linen

    variables = model.init(jax.random.key(0), x)                  # {'params': ..., 'batch_stats': ...}
    strategy = esx.eggroll(population_size=128, sigma=0.05, optimizer=optax.adam(1e-2), rank=4,
                           labels=esx_linen.labels(model, variables, x))
    state = strategy.init(jax.random.key(1), variables)

    def fitness(view, key, batch):                              # view: `variables` with member views as leaves
        with esx_linen.members():                               # or: esx_linen.apply(model, view, batch["x"])
            y = model.apply(view, batch["x"])                    # the model's own apply, unchanged
        return -jnp.mean((y - batch["y"]) ** 2)

    state, metrics = esx.step(strategy, state, fitness, key, batch)
    model.apply(state.params, x)                                 # the trained model: plain arrays, plain Flax

**What runs how.** :func:`apply` (and ``model.apply`` inside :func:`members`) first traces the model abstractly
(``jax.eval_shape``, at trace time only) to see which layer owns which variable, then runs the real apply with a
method interceptor (``nn.intercept_methods``):

* ``nn.Dense`` -- ``x @ kernel`` as :func:`esx.dense` (``kernel [in, out]``, label ``"lowrank"``);
* ``nn.DenseGeneral`` without ``batch_dims`` -- the ``k = len(axis)`` contracted axes (any axes, moved last) with
  the kernel ``[*in, *out]`` as one matrix: label ``"lowrank"`` for a 2-D kernel, ``"lowrank:k"`` otherwise (e.g.
  attention's query/key/value kernels ``[d, heads, head_dim]`` -> ``"lowrank:1"``, its output kernel
  ``[heads, head_dim, d]`` -> ``"lowrank:2"``);
* ``nn.Embed`` -- ``__call__`` as :func:`esx.embed` and ``attend`` as ``esx.dense(q, table, layout="out_in")``
  (``embedding [vocab, dim]``, label ``"lowrank"``);
* everything else gets plain arrays: full-rank (``"full"``) leaves as ``esx.value``, other low-rank leaves
  (``nn.Conv``, ``nn.Einsum``, a ``self.param`` matrix of your own, a ``DenseGeneral`` with ``batch_dims``, a
  subclass that overrides ``__call__``, a custom ``dot_general``) materialised per member with one
  :class:`MaterializeWarning` naming them and their per-member cost.

The supported layers honour ``dtype`` / ``param_dtype`` and ``use_bias``; ``precision`` and ``dot_general`` settings
are not used on the low-rank path (a layer with a custom ``dot_general`` is materialised instead). Frozen leaves and
other collections (``batch_stats``, ``cache``) reach Flax as they are; ``mutable=[...]`` and ``rngs=`` work as with
``model.apply``.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esx import labels as labels_lib
from esx import ops
from esx.interop import _views
from esx.interop._views import MaterializeWarning

__all__ = ["MaterializeWarning", "SUPPORTED", "apply", "labels", "members"]

ADAPTER = "esx.interop.linen"
SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Embed)
"""The layer classes that run low-rank (subclasses too, unless they override ``__call__`` / ``attend``)."""

_ORIG_APPLY = nn.Module.apply


def _canon(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _param_name(mod: nn.Module) -> str:
    return "embedding" if isinstance(mod, nn.Embed) else "kernel"


def _rule(mod: nn.Module) -> tuple[int | None, str]:
    """``(k, why)``: the number of kernel axes ``mod`` contracts when it can run low-rank, else ``(None, reason)``."""
    for base in SUPPORTED:
        if isinstance(mod, base):
            break
    else:
        return None, f"{type(mod).__name__} has no low-rank rule"
    methods = ("__call__", "attend") if base is nn.Embed else ("__call__",)
    for m in methods:
        if getattr(type(mod), m) is not getattr(base, m):
            return None, f"{type(mod).__name__} overrides {base.__name__}.{m}"
    if base is nn.Embed:
        return 1, ""
    if getattr(mod, "dot_general", None) is not None or getattr(mod, "dot_general_cls", None) is not None:
        return None, f"{type(mod).__name__} has a custom dot_general"
    if base is nn.Dense:
        return 1, ""
    if _canon(mod.batch_dims):
        return None, "nn.DenseGeneral with batch_dims"
    return len(_canon(mod.axis)), ""


class _Plan:
    """Which variable each layer reads: ``rows[path] = k`` for the kernels of supported layers (``None`` where the
    layer cannot run low-rank) and ``owner[module path] = layer type`` for every module called."""

    def __init__(self):
        self.rows: dict[str, int | None] = {}
        self.biases: set[str] = set()
        self.why: dict[str, str] = {}
        self.owner: dict[str, str] = {}

    def record(self, mod: nn.Module) -> None:
        scope_path = "/".join(("params",) + tuple(mod.scope.path))
        self.owner.setdefault(scope_path, type(mod).__name__)
        if not isinstance(mod, SUPPORTED):
            return
        path = f"{scope_path}/{_param_name(mod)}"
        if not isinstance(mod, nn.Embed):
            self.biases.add(f"{scope_path}/bias")
        k, why = _rule(mod)
        if path in self.rows and self.rows[path] != k:   # one variable read by two incompatible layers
            k, why = None, f"read by two layers ({self.why.get(path) or 'low-rank'} / {why or 'low-rank'})"
        self.rows[path] = k
        self.why[path] = why

    def keeps(self, path: str, leaf: Any) -> bool:
        k = self.rows.get(path)
        return k is not None and _views.view_rows(leaf) == k

    def reason(self, path: str, leaf: Any) -> str:
        if path in self.rows:
            k = self.rows[path]
            if k is None:
                return self.why[path]
            return (f"a stack of matrices, not the {k}-row-axis kernel {self.owner.get(path.rsplit('/', 1)[0])} "
                    f"reads: label it {_views.lowrank_label(k, np.ndim(_views.base_of(leaf)))!r}")
        owner = self.owner.get(path.rsplit("/", 1)[0])
        return f"read by {owner}" if owner else "read outside the supported layers"


def _plan(model: nn.Module, variables: Any, args: tuple, kwargs: dict) -> _Plan:
    """Runs ``model.apply(variables, *args, **kwargs)`` abstractly (``jax.eval_shape``: no computation) with a
    recording interceptor; arrays among the arguments are passed as abstract values, everything else as is."""
    plan = _Plan()
    bases = jax.tree_util.tree_map(_views.base_of, variables, is_leaf=_views.is_view)
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dynamic = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray, np.generic))]

    def record(next_fun, a, kw, context):
        plan.record(context.module)
        return next_fun(*a, **kw)

    def run(bases, dyn):
        full = list(leaves)
        for i, x in zip(dynamic, dyn):
            full[i] = x
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        with nn.intercept_methods(record):
            return _ORIG_APPLY(model, bases, *a, **kw)

    jax.eval_shape(run, bases, [leaves[i] for i in dynamic])
    return plan


def _inputs(args: tuple, kwargs: dict, name: str):
    return args[0] if args else kwargs[name]


def _dense(mod: nn.Module, kernel: Any, x: jax.Array) -> jax.Array:
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    dtype = mod.dtype if mod.dtype is not None else _views.result_dtype(x, kernel, bias)
    x, kernel, bias = jnp.asarray(x, dtype), _views.cast(kernel, dtype), _views.cast(bias, dtype)
    if isinstance(mod, nn.Dense):
        y = ops.dense(x, kernel)
    else:
        y = _views.dense_general(x, kernel, _canon(mod.axis))
    return y if bias is None else y + bias


def _embed(mod: nn.Module, table: Any, method: str, arg: jax.Array) -> jax.Array:
    if method == "attend":
        dtype = mod.dtype if mod.dtype is not None else _views.result_dtype(arg, table)
        return ops.dense(jnp.asarray(arg, dtype), _views.cast(table, dtype), layout="out_in")
    return _views.embed_lookup(arg, table, mod.dtype, mod.num_embeddings)


def _interceptor(next_fun, args, kwargs, context):
    """Runs the supported layers' ``__call__`` / ``attend`` low-rank when their kernel is a kept low-rank view."""
    mod = context.module
    if context.method_name in ("__call__", "attend") and isinstance(mod, SUPPORTED):
        name = _param_name(mod)
        if _rule(mod)[0] is not None and mod.has_variable("params", name):
            w = mod.get_variable("params", name)
            if _views.is_lowrank(w):
                if isinstance(mod, nn.Embed):
                    return _embed(mod, w, context.method_name, _inputs(args, kwargs, "inputs" if
                                                                       context.method_name == "__call__" else "query"))
                return _dense(mod, w, _inputs(args, kwargs, "inputs"))
    return next_fun(*args, **kwargs)


def apply(model: nn.Module, variables: Any, *args, **kwargs) -> Any:
    """``model.apply(variables, *args, **kwargs)`` on a member view: a drop-in with the same arguments and result.

    Args:
      model: any linen module (unchanged).
      variables: ``{collection: ...}`` as ``model.init`` returns it, with member views where esx perturbs
        (the ``view`` a fitness receives when the strategy was initialised on ``variables``), or plain arrays.
      *args, **kwargs: as for ``model.apply`` (``rngs=``, ``mutable=``, ``method=``, the model's own arguments).

    Returns:
      what ``model.apply`` returns. Plain variables (no views) go straight to ``model.apply``.
    """
    if not _views.has_views(variables):
        return _ORIG_APPLY(model, variables, *args, **kwargs)
    plan = _plan(model, variables, args, kwargs)
    flat = jax.tree_util.tree_flatten_with_path(variables, is_leaf=_views.is_view)[0]
    why = {labels_lib.path_to_str(p): plan.reason(labels_lib.path_to_str(p), v) for p, v in flat
           if _views.is_lowrank(v)}
    resolved = _views.resolve(variables, plan.keeps, ADAPTER, why=why)
    with nn.intercept_methods(_interceptor):
        return _ORIG_APPLY(model, resolved, *args, **kwargs)


_patch_lock = threading.Lock()
_patch_depth = 0


def _patched_apply(self, variables, *args, **kwargs):
    return apply(self, variables, *args, **kwargs)


@contextlib.contextmanager
def members():
    """Inside this block, ``model.apply(variables, ...)`` of any linen module behaves as :func:`apply`: member
    views run low-rank, plain variables go to Flax as usual. Put it inside the fitness (it only matters while
    the fitness is traced). It sets ``flax.linen.Module.apply`` for the block's duration (nestable)."""
    global _patch_depth
    with _patch_lock:
        _patch_depth += 1
        if _patch_depth == 1:
            nn.Module.apply = _patched_apply
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                nn.Module.apply = _ORIG_APPLY


def labels(model: nn.Module, variables: Any, *args, overrides: Any = None, **kwargs) -> Any:
    """The esx label tree for ``variables`` (pass it as ``labels=`` to :func:`esx.eggroll`).

    Traces ``model.apply(variables, *args, **kwargs)`` abstractly (sample inputs of the right shapes are enough)
    to see which layer reads which variable:

    * kernels of ``nn.Dense`` / ``nn.Embed`` and 2-D ``nn.DenseGeneral`` kernels: ``"lowrank"``;
    * N-D ``nn.DenseGeneral`` kernels contracting ``k`` axes: ``"lowrank:k"`` (one ``[*in, *out]`` matrix);
    * other floating ``params``: esx's default (``"lowrank"`` for ``ndim >= 2``, run materialised with the warning;
      ``"full"`` for biases, norm scales and other vectors);
    * every other collection (``batch_stats``, ``cache``, ...) and non-floating leaves: ``"frozen"``.

    Args:
      model: the linen module.
      variables: ``model.init``'s result (``{"params": ..., ...}``), or its ``"params"`` alone (then the labels are
        for that tree).
      *args, **kwargs: sample arguments for ``model.apply``.
      overrides: ``{glob on the /-joined path: label}`` applied on top (first match wins, a pattern that matches
        nothing is an error), e.g. ``{"params/head/*": "frozen"}``.

    Returns:
      a tree shaped like ``variables`` whose leaves are label strings.
    """
    wrapped = not (isinstance(variables, dict) or hasattr(variables, "keys")) or "params" not in variables
    full = {"params": variables} if wrapped else variables
    plan = _plan(model, full, args, kwargs)
    flat, treedef = jax.tree_util.tree_flatten_with_path(full)
    paths, labs = [], []
    for path, leaf in flat:
        p = labels_lib.path_to_str(path)
        if p.split("/", 1)[0] != "params" or _views.default_label(leaf) == labels_lib.FROZEN:
            lab = labels_lib.FROZEN
        elif plan.rows.get(p) is not None:
            lab = _views.lowrank_label(plan.rows[p], np.ndim(leaf))
        elif p in plan.biases:   # a supported layer's bias is full-rank whatever its shape
            lab = labels_lib.FULL
        else:
            lab = _views.default_label(leaf)
        paths.append(p.split("/", 1)[1] if wrapped else p)
        labs.append(lab)
    labs = _views.apply_overrides(paths, labs, overrides)
    tree = jax.tree_util.tree_unflatten(treedef, labs)
    return tree["params"] if wrapped else tree
