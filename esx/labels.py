"""Per-leaf perturbation labels: ``"lowrank"``, ``"full"`` or ``"frozen"``.

Every parameter leaf gets one label that decides how evolution strategies treat it:

* ``"lowrank"`` -- a matrix (or a stack of matrices, see below) perturbed by EGGROLL's rank-r noise
  ``E = A Bᵀ / √r`` with ``A: float[..., m, r]`` and ``B: float[..., n, r]``. Any leading axes beyond the
  last two are *stack* axes (for example the layer axis of scanned layers): every slice gets its own,
  independent noise.
* ``"lowrank:k"`` (:func:`lowrank`) -- an N-D leaf that is *one* matrix whose rows are its first ``k`` axes and
  whose columns are the rest, e.g. a Flax ``DenseGeneral`` kernel ``[d, heads, head_dim]`` (``k = 1``) or its output
  kernel ``[heads, head_dim, d]`` (``k = 2``): ``A: float[*shape[:k], r]``, ``B: float[*shape[k:], r]``, the noise
  of the flattened ``[prod(shape[:k]), prod(shape[k:])]`` matrix. :func:`esx.dense` contracts the last ``k`` axes
  of its input with it. (``int_eggroll`` takes matrices and stacks only.)
* ``"full"`` -- an ordinary full-rank Gaussian perturbation ``σ ε`` with ``ε`` the shape of the leaf
  (biases, norm scales, scalars; and every leaf in the full-rank ``open_es`` baseline).
* ``"frozen"`` -- neither perturbed nor updated.

The default labeller marks floating leaves with ``ndim >= 2`` as ``"lowrank"`` and the rest as ``"full"``.
Overrides are a mapping from glob patterns (:func:`fnmatch.fnmatchcase`) on the leaf's *path string* to a
label; the first matching pattern wins and a pattern that matches no leaf is an error (it is almost always
a typo). Path strings join the pytree keys with ``/``: ``{"layers": [{"w": ...}]}`` gives ``"layers/0/w"``.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

LOWRANK = "lowrank"
FULL = "full"
FROZEN = "frozen"
LABELS = (LOWRANK, FULL, FROZEN)

Labeller = Callable[[str, Any], str]


def lowrank(rows: int) -> str:
    """The label ``"lowrank:rows"``: the leaf is one matrix whose rows are its first ``rows`` axes (see above)."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise ValueError(f"lowrank(rows={rows!r}); rows must be an integer >= 1")
    return f"{LOWRANK}:{rows}"


def split(label: str) -> tuple[str, int | None]:
    """``(kind, rows)``: ``("lowrank", k)`` for ``"lowrank:k"``, ``(label, None)`` for the plain labels.

    Raises ``ValueError`` for anything that is not a valid label."""
    if isinstance(label, str) and label.startswith(LOWRANK + ":"):
        tail = label[len(LOWRANK) + 1:]
        if tail.isdigit() and int(tail) >= 1:
            return LOWRANK, int(tail)
    elif label in LABELS:
        return label, None
    raise ValueError(f"label {label!r}; valid labels are {LABELS} and 'lowrank:k' (k >= 1 row axes)")


def path_to_str(path: tuple) -> str:
    """Turns a ``jax.tree_util`` key path into the ``/``-joined string used for labels and noise keys."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(str(entry.name))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:  # pragma: no cover - future key types
            parts.append(str(entry))
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
    """Path strings of every leaf of ``tree`` in flattening order."""
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def default_labeller(path: str, leaf: Any) -> str:
    """``"lowrank"`` for floating leaves with ``ndim >= 2``, ``"full"`` otherwise."""
    del path
    return LOWRANK if np.ndim(leaf) >= 2 else FULL


def apply_overrides(paths: list[str], labels: list[str], overrides: Mapping[str, str] | None) -> list[str]:
    """``labels`` (one per path) with the glob ``overrides`` ``{pattern: label}`` on the ``/``-joined ``paths``
    applied, first match wins; ``ValueError`` for a pattern that matches no path (almost always a typo)."""
    if not overrides:
        return list(labels)
    labels = list(labels)
    used = {pattern: False for pattern in overrides}
    for i, p in enumerate(paths):
        for pattern, label in overrides.items():
            if fnmatch.fnmatchcase(p, pattern):
                labels[i] = label
                used[pattern] = True
                break
    unused = [pattern for pattern, hit in used.items() if not hit]
    if unused:
        raise ValueError(f"labels: override pattern(s) {unused} match no parameter; valid paths are {paths}")
    return labels


def make_labels(
    params: Any,
    overrides: Mapping[str, str] | Labeller | None = None,
) -> Any:
    """Builds the label pytree for ``params``.

    Args:
      params: any pytree of arrays.
      overrides: ``None`` (default labeller), a mapping ``{glob pattern on the path string: label}``
        applied on top of the default labeller (first match wins), or a function ``(path, leaf) -> label``.

    Returns:
      A pytree with the structure of ``params`` whose leaves are label strings.

    Raises:
      ValueError: an unknown label, a pattern that matches no leaf, or ``"lowrank"`` on a leaf with
        fewer than two dimensions.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    if callable(overrides):
        labels = [overrides(p, leaf) for p, leaf in zip(paths, leaves)]
    else:
        labels = apply_overrides(paths, [default_labeller(p, leaf) for p, leaf in zip(paths, leaves)], overrides)
    labels_tree = jax.tree_util.tree_unflatten(treedef, labels)
    check_labels(params, labels_tree)
    return labels_tree


def check_labels(params: Any, labels: Any) -> None:
    """Raises ``ValueError`` unless ``labels`` matches ``params`` leaf for leaf with valid labels."""
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
    l_leaves, l_def = jax.tree_util.tree_flatten(labels)
    if l_def != p_def:
        raise ValueError(
            "labels: the label tree does not match the parameter tree.\n"
            f"  parameters: {p_def}\n  labels:     {l_def}"
        )
    for (path, leaf), label in zip(p_flat, l_leaves):
        name = path_to_str(path)
        try:
            kind, rows = split(label)
        except ValueError:
            raise ValueError(f"labels: leaf {name!r} has label {label!r}; valid labels are {LABELS} and "
                             "'lowrank:k' (esx.labels.lowrank(k))") from None
        if rows is not None and not 1 <= rows < np.ndim(leaf):
            raise ValueError(
                f"labels: leaf {name!r} has shape {np.shape(leaf)} but label {label!r} needs 1 <= k < ndim "
                "(k row axes, the rest are columns)")
        if kind == LOWRANK and np.ndim(leaf) < 2:
            raise ValueError(
                f"labels: leaf {name!r} has shape {np.shape(leaf)} but label 'lowrank' needs ndim >= 2 "
                "(use 'full' for vectors and scalars)"
            )
