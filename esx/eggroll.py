"""EGGROLL: evolution strategies with low-rank perturbations (Sarkar et al., 2025, §2 of PAPER.md)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from esx.strategy import Strategy, make_strategy


def eggroll(
    *,
    population_size: int,
    sigma: float | Callable[[jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    rank: int = 1,
    antithetic: bool = True,
    group_size: int = 1,
    shaping: str | Callable[[jax.Array], jax.Array] = "centered_rank",
    noise_reuse: int = 1,
    noise_source: str = "normal",
    table_size: int = 1 << 22,
    labels: Any = None,
    member_batch: int | None = None,
    member_order: str = "signs_outer",
) -> Strategy:
    """EGGROLL: each ``"lowrank"`` leaf ``W: [m, n]`` of member ``i`` is perturbed by ``σ s_i A_i B_iᵀ / √r``.

    Args:
      population_size: ``N``, the number of members per generation (even with antithetic sampling).
      sigma: noise scale ``σ > 0``, or a schedule ``generation -> σ`` (e.g. an optax schedule).
      optimizer: any ``optax.GradientTransformation``; it receives ``-g``, the negated ES gradient estimate
        ``g = 1/(Nσ) Σ f_i s_i E_i`` (see :mod:`esx.strategy` for converting the paper's learning rates).
      rank: ``r >= 1``, the rank of each member's perturbation of a matrix.
      antithetic: members ``2k`` / ``2k+1`` share noise with signs ``+1`` / ``-1``.
      group_size: consecutive members that share evaluation data and key; ``N`` must be a multiple of it.
      shaping: ``"centered_rank"`` (default), ``"z_score"``, ``"group_z_score"``, ``"pair_sign"``,
        ``"identity"`` or a callable ``float[N] -> float[N]``. Fitness is higher-is-better.
      noise_reuse: keep each member's noise for this many generations; ``0`` = the same noise every generation.
      noise_source: ``"normal"`` (default, exact normals), ``"hash"`` (±1 from a counter hash: the fastest,
        recommended for speed), ``"binomial"``, ``"rademacher"`` or ``"table"`` (see :mod:`esx.noise`).
      table_size: entries of the shared table for ``noise_source="table"``.
      labels: ``None`` (matrices low-rank, the rest full), ``{glob: label}`` overrides, a function
        ``(path, leaf) -> label`` or a label pytree (see :mod:`esx.labels`).
      member_batch: evaluate (and contract for the update) ``member_batch`` members at a time, each chunk's noise
        drawn inside a loop, so memory grows with ``member_batch`` rather than ``population_size``; a positive
        divisor of ``population_size`` (even with antithetic sampling). ``None`` (default): all at once. Same
        fitness; the update equal up to float summation order (docs/hyperscale.md).
      member_order: the layout of ``evaluate``'s ``vmap`` over members: the same fitness either way (exactly for
        elementwise work, to float rounding where XLA blocks a matrix product differently; a speed choice,
        docs/hyperscale.md). ``"signs_outer"`` (default): ``[2, P]`` with antithetic sampling, so a
        fitness function's own per-member scalar work (an RL rollout's PRNG calls) runs on long contiguous axes.
        ``"pairs_outer"``: ``[P, 2]``, so a member's activations ``[P, 2, d]`` meet its pair's factors ``[P, d]``
        without a transpose: faster for wide per-member state carried through a loop (an RNN's hidden state).

    Returns:
      A :class:`esx.Strategy`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, esx
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> def fitness(p, key, data):
      ...     y = esx.dense(data, p["w"]) + esx.value(p["b"])
      ...     return -jnp.sum((y - 1.0) ** 2)
      >>> strategy = esx.eggroll(population_size=64, sigma=0.1, optimizer=optax.adam(0.05), rank=2)
      >>> state = strategy.init(jax.random.key(0), params)
      >>> for _ in range(100):
      ...     state, metrics = esx.step(strategy, state, fitness, jax.random.key(1), jnp.ones((4, 3)))
      >>> bool(metrics.fitness_mean > -0.5)
      True
    """
    return make_strategy(
        population_size=population_size, rank=rank, sigma=sigma, optimizer=optimizer, lowrank=True,
        antithetic=antithetic, group_size=group_size, shaping=shaping, noise_reuse=noise_reuse,
        noise_source=noise_source, table_size=table_size, labels=labels,
        member_batch=member_batch, member_order=member_order,
    )
