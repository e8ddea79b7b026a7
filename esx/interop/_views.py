"""Helpers shared by the framework adapters: recognising member views, casting them, and the one-time warning of the
fallback that materialises a low-rank leaf for a layer esx cannot run low-rank.

Every adapter resolves a member view the same way before the framework's own code sees it:

* :class:`esx.Full` leaves (biases, norm scales, anything labelled ``"full"``) become plain arrays (``esx.value``):
  full-rank noise costs the leaf's size per member whatever the layer does, so nothing is lost and nothing is said;
* :class:`esx.LowRank` / :class:`esx.SplitLowRank` leaves that a supported layer consumes stay views (the layer
  then runs ``x W + c (x A) Bᵀ``);
* every other low-rank leaf is materialised (``base + c · A Bᵀ``, a full matrix per member) and named, with its
  per-member cost, in one :class:`MaterializeWarning` per distinct set of leaves (per process; see
  :func:`reset_warnings`).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from esx import labels as labels_lib
from esx import ops

VIEW_TYPES = (ops.LowRank, ops.SplitLowRank, ops.Full)
LOWRANK_TYPES = (ops.LowRank, ops.SplitLowRank)


class MaterializeWarning(UserWarning):
    """A low-rank member view was materialised (a full matrix per member) for a layer that cannot run it low-rank."""


def is_view(x: Any) -> bool:
    """Whether ``x`` is a member view (:class:`esx.LowRank`, :class:`esx.SplitLowRank` or :class:`esx.Full`)."""
    return isinstance(x, VIEW_TYPES)


def is_lowrank(x: Any) -> bool:
    """Whether ``x`` is a low-rank member view (:class:`esx.LowRank` / :class:`esx.SplitLowRank`)."""
    return isinstance(x, LOWRANK_TYPES)


def has_views(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a member view."""
    return any(is_view(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_view))


def base_of(x: Any) -> Any:
    """The unperturbed array of a view (``x.base``), or ``x`` itself."""
    return x.base if is_view(x) else x


def dtype_of(x: Any) -> Any:
    """The dtype of an array or a view (its base's); ``None`` for ``None``."""
    return None if x is None else jnp.dtype(base_of(x).dtype)


def cast(x: Any, dtype: Any) -> Any:
    """``x`` as ``dtype``: arrays by ``astype``; a low-rank view has its base and factors cast (it stays a view)."""
    if x is None or dtype is None:
        return x
    if isinstance(x, ops.LowRank):
        if x.base.dtype == dtype:
            return x
        return dataclasses.replace(x, base=x.base.astype(dtype), a=x.a.astype(dtype), b=x.b.astype(dtype))
    if isinstance(x, ops.SplitLowRank):
        if x.base.dtype == dtype:
            return x
        return dataclasses.replace(x, base=x.base.astype(dtype), a=tuple(v.astype(dtype) for v in x.a),
                                   b=tuple(v.astype(dtype) for v in x.b))
    return jnp.asarray(ops.value(x), dtype)


def result_dtype(*xs: Any) -> Any:
    """The promoted dtype of arrays / views (as Flax's ``promote_dtype`` with ``dtype=None``)."""
    return jnp.result_type(*[dtype_of(x) for x in xs if x is not None])


def value_or_none(x: Any) -> Any:
    """:func:`esx.value` of ``x``, or ``None`` (an optional bias)."""
    return None if x is None else ops.value(x)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def member_cost(leaf: Any) -> tuple[int, int]:
    """``(elements, bytes)`` one member pays to materialise ``leaf`` (its full shape)."""
    shape = tuple(np.shape(base_of(leaf)))
    n = math.prod(shape)
    return n, n * jnp.dtype(dtype_of(leaf)).itemsize


_WARNED: set = set()


def reset_warnings() -> None:
    """Forgets which fallbacks were warned about, so the next one warns again (tests, notebooks)."""
    _WARNED.clear()


def warn_materialized(adapter: str, items: list[tuple[str, Any]], why: dict | None = None,
                      stacklevel: int = 3) -> None:
    """One :class:`MaterializeWarning` naming the low-rank leaves ``items: [(path, view)]`` that ``adapter``
    materialises per member and what each costs; warned once per process for the same adapter and leaves."""
    if not items:
        return
    key = (adapter, tuple((p, tuple(np.shape(base_of(v)))) for p, v in items))
    if key in _WARNED:
        return
    _WARNED.add(key)
    total = 0
    parts = []
    for path, leaf in items:
        n, nbytes = member_cost(leaf)
        total += nbytes
        shape = "×".join(map(str, np.shape(base_of(leaf))))
        reason = f"; {why[path]}" if why and path in why else ""
        parts.append(f"{path} [{shape}] ({n} {np.dtype(dtype_of(leaf)).name}, {_bytes(nbytes)}{reason})")
    warnings.warn(
        f"{adapter}: {len(items)} low-rank parameter(s) feed layers that esx cannot run low-rank, so every member "
        f"materialises them (base + c·A·Bᵀ, a full copy per member, {_bytes(total)} per member in all, times the "
        f"population): {'; '.join(parts)}. The result is correct, only slower; label them 'full' (the same cost, "
        f"full-rank noise) or 'frozen' to make this explicit, or use esx.dense/esx.embed in that layer.",
        MaterializeWarning, stacklevel=stacklevel)


def resolve(tree: Any, keep: Callable[[str, Any], bool], adapter: str, *, stacklevel: int = 4,
            why: dict | None = None) -> Any:
    """``tree`` with :class:`esx.Full` leaves as plain arrays, the low-rank views for which ``keep(path, view)`` is
    true left as views, and every other low-rank view materialised, with :func:`warn_materialized`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_view)
    out, dropped = [], []
    for path, leaf in flat:
        if isinstance(leaf, ops.Full):
            leaf = ops.value(leaf)
        elif is_lowrank(leaf):
            p = labels_lib.path_to_str(path)
            if not keep(p, leaf):
                dropped.append((p, leaf))
                leaf = ops.value(leaf)
        out.append(leaf)
    warn_materialized(adapter, dropped, why, stacklevel=stacklevel)
    return jax.tree_util.tree_unflatten(treedef, out)


def lowrank_label(rows: int | None, ndim: int) -> str:
    """The label of a layer kernel that contracts its first ``rows`` axes: ``"lowrank"`` for a matrix,
    ``"lowrank:rows"`` (:func:`esx.labels.lowrank`) for a tensor."""
    if rows is None or ndim == 2:
        return labels_lib.LOWRANK
    return labels_lib.lowrank(rows)


def default_label(leaf: Any) -> str:
    """esx's default for a leaf no layer claims: ``"frozen"`` for non-floating leaves, ``"lowrank"`` for floating
    leaves with ``ndim >= 2`` (materialised per member by the adapters, with the warning), ``"full"`` otherwise."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        return labels_lib.FROZEN
    return labels_lib.LOWRANK if np.ndim(leaf) >= 2 else labels_lib.FULL


def apply_overrides(paths: list[str], labels: list[str], overrides: Any) -> list[str]:
    """:func:`esx.labels.apply_overrides`: glob ``overrides`` on the paths, first match wins, unmatched is an error."""
    return labels_lib.apply_overrides(paths, labels, overrides)


def view_rows(w: Any) -> int | None:
    """How many leading axes of a low-rank view are its matrix rows: ``1`` for a matrix ``[m, n]``, ``k`` for a
    tensor view (label ``"lowrank:k"``: ``base [*in, *out]``, ``a [*in, r]``, ``b [*out, r]``), ``None`` for a stack
    of matrices (label ``"lowrank"`` on an N-D leaf: each slice perturbed on its own) or anything else."""
    if isinstance(w, ops.SplitLowRank):
        return 1 if w.base.ndim == 2 else None
    if not isinstance(w, ops.LowRank):
        return None
    if w.base.ndim == 2 and w.a.ndim == 2:
        return 1
    if w.base.ndim > 2 and w.a.ndim + w.b.ndim - 2 == w.base.ndim:
        return w.a.ndim - 1
    return None


def dense_general(x: jax.Array, kernel: Any, axis: tuple[int, ...]) -> jax.Array:
    """``x`` contracted over its axes ``axis`` with the first ``len(axis)`` axes of ``kernel`` (a low-rank view
    ``[*in, *out]`` with :func:`view_rows` ``== len(axis)``): ``lax.dot_general`` without batch axes, computed as
    :func:`esx.dense` after moving the contracted axes last (their order kept). Returns ``[*other axes of x, *out]``."""
    k = len(axis)
    axis = tuple(a % x.ndim for a in axis)
    trailing = tuple(range(x.ndim - k, x.ndim))
    if axis != trailing:
        x = jnp.moveaxis(x, axis, trailing)
    return ops.dense(x, kernel)   # a matrix, or a "lowrank:k" tensor view (contracts the last k axes of x)


def embed_lookup(ids: jax.Array, table: Any, dtype: Any, num_embeddings: int) -> jax.Array:
    """A Flax ``Embed`` lookup on a view: ``ids: int[...]`` -> ``float[..., dim]`` with Flax's checks (integer ids;
    a one-row table always gives row 0) and its ``dtype``."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    table = cast(table, dtype)
    if num_embeddings == 1:
        return ops.embed(jnp.zeros(ids.shape, jnp.int32), table)
    return ops.embed(ids, table)
