"""OpenES (Salimans et al., 2017): the full-rank Gaussian ES baseline, with the same API as :func:`esx.eggroll`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from esx.strategy import Strategy, make_strategy


def open_es(
    *,
    population_size: int,
    sigma: float | Callable[[jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
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
    """Full-rank ES: every non-frozen leaf of member ``i`` is perturbed by ``σ s_i ε_i`` with ``ε_i`` of its shape.

    Same arguments (``member_batch`` and ``member_order`` included) and semantics as :func:`esx.eggroll` without
    ``rank``; ``"lowrank"`` labels are treated as ``"full"``. Each member's forward through a matrix forms its own ``m×n``
    weight -- this is the cost EGGROLL removes, kept here as the like-for-like baseline.
    """
    return make_strategy(
        population_size=population_size, rank=1, sigma=sigma, optimizer=optimizer, lowrank=False,
        antithetic=antithetic, group_size=group_size, shaping=shaping, noise_reuse=noise_reuse,
        noise_source=noise_source, table_size=table_size, labels=labels,
        member_batch=member_batch, member_order=member_order,
    )
