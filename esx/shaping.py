"""Fitness shaping. Fitness is **higher is better** everywhere in esx.

A shaping function maps raw fitness ``float[N]`` (members in order, antithetic partners at ``2k, 2k+1``) to the
weights ``float[N]`` that multiply each member's noise in the update. All of them follow one policy for
**non-finite fitness** (NaN, +inf, -inf): such a member counts as a failed evaluation and is given the worst
finite fitness of the population before shaping (so it ranks last, ties with the worst, and can never push
parameters to NaN). If no member is finite the generation is skipped: ``tell`` leaves parameters and optimizer
state untouched (only the generation counter advances) and reports ``metrics.skipped``. The number of
non-finite members is reported by ``tell`` as ``metrics.num_nonfinite``. ``tell`` also skips (and reports) any
update that would make a parameter or optimizer-state entry non-finite.

==================  =============================================================================
``centered_rank``   ``rank / (N - 1) - 0.5`` in ``[-0.5, 0.5]`` (ties share their mean rank)
``z_score``         ``(f - mean) / sqrt(var + 1e-5)``
``group_z_score``   subtract each group's mean (``group_size`` consecutive members), divide by global std
``pair_sign``       ``+sign(f⁺ - f⁻)`` for the ``+`` member of each antithetic pair, ``0`` for its partner
``identity``        ``f`` unchanged
==================  =============================================================================
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Shaping = Callable[[jax.Array], jax.Array]


def sanitize(fitness: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replaces non-finite entries by the worst finite fitness.

    Args:
      fitness: ``float[N]``.

    Returns:
      ``(clean float[N], finite bool[N])``. If nothing is finite, ``clean`` is all zeros.
    """
    fitness = jnp.asarray(fitness, jnp.float32)
    finite = jnp.isfinite(fitness)
    worst = jnp.min(jnp.where(finite, fitness, jnp.inf))
    worst = jnp.where(jnp.isfinite(worst), worst, 0.0)
    return jnp.where(finite, fitness, worst), finite


def identity(fitness: jax.Array) -> jax.Array:
    """Raw fitness (non-finite replaced by the worst finite value). ``float[N] -> float[N]``."""
    return sanitize(fitness)[0]


def centered_rank(fitness: jax.Array) -> jax.Array:
    """``rank / (N - 1) - 0.5``; tied values get the mean of their ranks. ``float[N] -> float[N]``."""
    f, _ = sanitize(fitness)
    n = f.shape[0]
    # Average rank of ties: (#less + (#less_or_equal - 1)) / 2, computed from a sort (O(N log N)).
    s = jnp.sort(f)
    less = jnp.searchsorted(s, f, side="left").astype(jnp.float32)
    less_eq = jnp.searchsorted(s, f, side="right").astype(jnp.float32)
    rank = (less + less_eq - 1.0) / 2.0
    return rank / max(n - 1, 1) - 0.5


def z_score(fitness: jax.Array) -> jax.Array:
    """``(f - mean) / sqrt(var + 1e-5)`` over the population. ``float[N] -> float[N]``."""
    f, _ = sanitize(fitness)
    return (f - f.mean()) / jnp.sqrt(f.var() + 1e-5)


def group_z_score(group_size: int) -> Shaping:
    """Per-group baseline, global scale (as in GRPO): ``(f - mean_group) / sqrt(var_global + 1e-5)``.

    Args:
      group_size: number of consecutive members that share data (a prompt, a sequence, an env seed).
        The population size must be a multiple of it.

    Returns:
      the shaping ``float[N] -> float[N]``.
    """
    if group_size < 1:
        raise ValueError(f"group_z_score: group_size={group_size}; must be >= 1")

    def shape(fitness: jax.Array) -> jax.Array:
        f, _ = sanitize(fitness)
        n = f.shape[0]
        if n % group_size:
            raise ValueError(
                f"group_z_score: population_size={n} is not a multiple of group_size={group_size}"
            )
        g = f.reshape(n // group_size, group_size)
        centered = (g - g.mean(axis=1, keepdims=True)).reshape(n)
        return centered / jnp.sqrt(f.var() + 1e-5)

    shape.group_size = group_size  # type: ignore[attr-defined]
    return shape


def pair_sign(fitness: jax.Array) -> jax.Array:
    """``sign(f[2k] - f[2k+1])`` on the ``+`` member of each antithetic pair and ``0`` on its partner.

    With antithetic noise the update weight of a pair is ``w[2k] - w[2k+1]``, so this gives each pair
    a weight in ``{-1, 0, +1}``. ``float[N] -> float[N]`` (``N`` even).
    """
    f, _ = sanitize(fitness)
    n = f.shape[0]
    if n % 2:
        raise ValueError(f"pair_sign: population_size={n} must be even (antithetic pairs)")
    d = jnp.sign(f[0::2] - f[1::2])
    return jnp.stack([d, jnp.zeros_like(d)], axis=1).reshape(n)


SHAPINGS: dict[str, Shaping] = {
    "centered_rank": centered_rank,
    "z_score": z_score,
    "pair_sign": pair_sign,
    "identity": identity,
}


def get(name_or_fn: str | Shaping, group_size: int = 1) -> Shaping:
    """Resolves a shaping name (``"centered_rank"``, ``"z_score"``, ``"group_z_score"``, ``"pair_sign"``,
    ``"identity"``) or returns a callable unchanged: a shaping ``float[N] -> float[N]``."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn == "group_z_score":
        return group_z_score(group_size)
    if name_or_fn not in SHAPINGS:
        raise ValueError(
            f"shaping={name_or_fn!r}; valid names are {sorted([*SHAPINGS, 'group_z_score'])} or a callable"
        )
    return SHAPINGS[name_or_fn]
