"""Optax gradient transformations for fine-tuning with ES: anchored weight decay and per-path step-size multipliers.

Both are ordinary :class:`optax.GradientTransformation` objects that go after the optimizer in an
:func:`optax.chain` (esx hands the optimizer ``-g``, so the chain's output is the step that
:func:`optax.apply_updates` adds to the parameters)::

    opt = optax.chain(optax.adam(1e-4),
                      esx.scale_by_path({"embed": 0.1, "lm_head": 0.0}),   # per-leaf step-size multipliers
                      esx.anchored_weight_decay(1e-3))                      # pull toward the initial weights
    strategy = esx.eggroll(population_size=64, sigma=1e-3, optimizer=opt)

* :func:`anchored_weight_decay` ``(rate, anchor=None)``: adds ``-rate · (θ - θ₀)`` to the step, ``θ₀`` the anchor
  (default: the parameters handed to ``init``). With a zero step from the optimizer,
  ``θ_{t+1} - θ₀ = (1 - rate) (θ_t - θ₀)``: the distance to the anchor shrinks geometrically by ``rate`` per update
  (decoupled, as AdamW's decay, but toward ``θ₀`` instead of 0: a brake on forgetting during fine-tuning).
* :func:`scale_by_path` ``(multipliers)``: multiplies the step of every leaf whose path string (``/``-joined keys,
  as in :mod:`esx.labels`) matches a glob pattern by that pattern's factor (first match wins; leaves no pattern
  matches keep factor 1; a pattern that matches no leaf is an error at ``init``). ``0`` freezes a leaf's updates.

Only jax, optax and numpy are imported here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from esx.labels import apply_overrides, path_to_str


class AnchorState(NamedTuple):
    """The state of :func:`anchored_weight_decay`: ``anchor``, a pytree shaped like the parameters (``None`` when
    the anchor was given to the transformation itself)."""

    anchor: Any


def anchored_weight_decay(rate: float, anchor: Any = None) -> optax.GradientTransformation:
    """Decay toward ``anchor`` (default: the parameters given to ``init``) at ``rate`` per update.

    ``update(updates, state, params)`` returns ``updates - rate · (params - anchor)`` (each leaf in its own dtype).

    Args:
      rate: the fraction of the distance to the anchor removed per update, ``0 <= rate <= 1`` (a Python float).
      anchor: a pytree shaped like the parameters, or ``None``: the parameters handed to ``init`` are stored in
        the state (one extra copy of the parameters).

    Raises:
      ValueError: ``rate`` outside ``[0, 1]``; ``update`` without ``params``.
    """
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"anchored_weight_decay: rate={rate}; must be in [0, 1] (a fraction per update)")

    def init(params):
        return AnchorState(None if anchor is not None else jax.tree_util.tree_map(jnp.asarray, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("anchored_weight_decay needs params: call update(updates, state, params)")
        ref = anchor if anchor is not None else state.anchor
        new = jax.tree_util.tree_map(
            lambda u, p, a: (u - rate * (p - jnp.asarray(a, p.dtype))).astype(u.dtype), updates, params, ref)
        return new, state

    return optax.GradientTransformation(init, update)


def path_multipliers(params: Any, multipliers: Mapping[str, float]) -> Any:
    """The factor of every leaf of ``params`` (a pytree of Python floats shaped like it): the value of the first
    glob pattern of ``multipliers`` that matches the leaf's path string, else 1.0.

    Raises:
      ValueError: a pattern that matches no leaf (the message lists the paths).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(p) for p, _ in flat]
    try:   # the labels' own glob rule: first match wins, a pattern that matches nothing is an error
        factors = apply_overrides(paths, [1.0] * len(paths), multipliers)
    except ValueError as err:
        raise ValueError(f"scale_by_path: {err}") from None
    return jax.tree_util.tree_unflatten(treedef, [float(f) for f in factors])


def scale_by_path(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies each leaf's step by the factor of :func:`path_multipliers` (checked at ``init``).

    Args:
      multipliers: ``{glob pattern on the leaf's path string: factor}``; e.g. ``{"embed": 0.1}`` or
        ``{"layers/w*": 2.0}``. A factor of 0 freezes the leaf, 2 doubles its step.
    """
    multipliers = {str(k): float(v) for k, v in dict(multipliers).items()}

    def init(params):
        path_multipliers(params, multipliers)   # fail early on a typo
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        factors = path_multipliers(updates, multipliers)
        return jax.tree_util.tree_map(lambda u, f: u if f == 1.0 else (u * f).astype(u.dtype), updates,
                                      factors), state

    return optax.GradientTransformation(init, update)


__all__ = ["AnchorState", "anchored_weight_decay", "path_multipliers", "scale_by_path"]
