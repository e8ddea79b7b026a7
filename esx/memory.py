"""The memory model of member batching (docs/hyperscale.md, "Memory model"): how many bytes one generation needs
for ``member_batch=K``, from XLA's own buffer accounting.

:func:`memory_estimate` compiles (never runs) the strategy's ``evaluate`` and ``tell`` for two batched values of
``K`` and, unless ``unbatched=False``, for the unbatched program, and reads ``compiled.memory_analysis()``:

* the **temporaries** (``temp_size_in_bytes``) of each program are fitted by a line ``a + b K`` through the two
  batched programs: ``b`` is the bytes per member of evaluation (the noise drawn for a chunk, the members'
  activations) and of the update (the chunk's noise regenerated for the contraction); ``a`` what a chunk loop
  holds whatever ``K`` is (the fitness vector, the shaped weights, the update's accumulator, the optimizer's
  intermediates);
* the **arguments and outputs** (``argument_size_in_bytes + output_size_in_bytes - alias_size_in_bytes``: the
  state, the data, the fitness vector, the new state) do not depend on ``K``.

The predicted peak of a generation with ``member_batch=K`` is the larger of the two phases (evaluation, then the
update, run one after the other): ``max(E₀ + K·e, U₀ + K·u)``, with ``E₀`` and ``U₀`` each phase's fixed bytes
(arguments, outputs and the temporaries' intercept). The unbatched program is not a chunk loop (XLA lays its
buffers out differently: on the benchmark MLP 8.2 KB per member against 10.3 KB per member in a chunk), so its
peak is its own measured value, not the line's.

Only jax, numpy and the standard library are used; compiling costs what compiling the step costs (six programs
by default), and nothing is executed or allocated on the device.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax

from esx import _members
from esx.base import Config, Strategy

__all__ = ["MemoryEstimate", "format_bytes", "memory_estimate", "with_member_batch"]


def with_member_batch(strategy: Strategy, member_batch: int | None) -> Strategy:
    """The same strategy (every option as built) with ``member_batch`` instead of its own.

    Rebuilt through its constructor (:func:`esx.strategy.make_strategy` or :func:`esx.int_eggroll.int_eggroll`)
    with the stored configuration, so it is an equal strategy: the same fitness for every member, the same update
    up to float summation order (docs/hyperscale.md). Raises ``ValueError`` for an invalid ``member_batch``
    (naming the valid values) and ``TypeError`` for a strategy that is not one of esx's own (e.g. a sharded or
    wrapped one: rebatch the strategy before sharding it).
    """
    from esx import int_eggroll as ie   # (esx.int_eggroll imports esx.base, never this module)
    from esx.strategy import make_strategy

    cfg = strategy.config
    if type(cfg) is Config:
        return make_strategy(
            population_size=cfg.population_size, rank=cfg.rank, sigma=cfg.sigma, optimizer=cfg.optimizer,
            lowrank=cfg.lowrank, antithetic=cfg.antithetic, group_size=cfg.group_size, shaping=cfg.shaping,
            noise_reuse=cfg.noise_reuse, noise_source=cfg.noise_source, table_size=cfg.table_size,
            labels=cfg.labels, member_batch=member_batch)
    if type(cfg) is ie.IntConfig:
        return ie.int_eggroll(
            population_size=cfg.population_size, sigma_shift=cfg.sigma_shift, rank=cfg.rank, alpha=cfg.alpha,
            alpha_decay=cfg.alpha_decay, group_size=cfg.group_size, noise_reuse=cfg.noise_reuse, labels=cfg.labels,
            member_batch=member_batch)
    raise TypeError(f"with_member_batch: a strategy with a {type(cfg).__name__} config is not one esx can rebuild "
                    "(eggroll, open_es, make_strategy, int_eggroll)")


def format_bytes(n: float) -> str:
    """``n`` bytes as text in binary units (``"1.5 GiB"``, ``"812 B"``)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class MemoryEstimate(NamedTuple):
    """Bytes of one generation as a function of ``member_batch`` (:func:`memory_estimate`).

    The predicted peak of ``member_batch=K`` is ``fixed_bytes + max(eval_temp_bytes + K · eval_bytes_per_member,
    update_temp_bytes + K · update_bytes_per_member)``; the unbatched program's (``K = N``) is measured.

    Attributes:
      population_size: ``N``.
      valid: the valid ``member_batch`` values (divisors of ``N``, even with antithetic sampling), ascending; the
        last is ``N`` (one chunk: the unbatched program).
      fixed_bytes: what a generation holds whatever ``K`` is, from start to end: the state and its update, the
        data, the fitness vector and the ``has_aux`` outputs (XLA's argument and output bytes).
      eval_bytes_per_member: bytes of evaluation temporaries per member of a chunk.
      update_bytes_per_member: bytes of update temporaries per member of a chunk.
      eval_temp_bytes, update_temp_bytes: each phase's temporaries that do not grow with ``K`` (the line's
        intercept: the chunk loop's carry, the shaped weights, the update's accumulator, the optimizer's work).
      unbatched_bytes: the measured peak of the unbatched programs (``None`` with ``unbatched=False``).
      samples: ``((K, eval_temp, update_temp), ...)``: the temporaries XLA reported for each compiled ``K``
        (``K = N``: the unbatched programs).
    """

    population_size: int
    valid: tuple
    fixed_bytes: int
    eval_bytes_per_member: float
    update_bytes_per_member: float
    eval_temp_bytes: int
    update_temp_bytes: int
    unbatched_bytes: int | None
    samples: tuple

    def eval_bytes(self, member_batch: int | None) -> float:
        """Predicted temporaries of evaluation with ``member_batch`` (``None``: ``N``, on the line)."""
        return self.eval_temp_bytes + self._k(member_batch) * self.eval_bytes_per_member

    def update_bytes(self, member_batch: int | None) -> float:
        """Predicted temporaries of the update (``tell``) with ``member_batch`` (``None``: ``N``, on the line)."""
        return self.update_temp_bytes + self._k(member_batch) * self.update_bytes_per_member

    def peak_bytes(self, member_batch: int | None) -> int:
        """The predicted peak of a generation with ``member_batch`` (``None`` or ``N``: the unbatched program,
        measured when the estimate compiled it)."""
        k = self._k(member_batch)
        if k == self.population_size and self.unbatched_bytes is not None:
            return int(self.unbatched_bytes)
        return int(math.ceil(self.fixed_bytes + max(self.eval_bytes(k), self.update_bytes(k))))

    def batch_for(self, budget_bytes: int, *, choices: Any = None) -> int | None:
        """The largest valid ``member_batch`` whose predicted peak fits in ``budget_bytes``: ``None`` when the
        unbatched program fits (nothing to gain), else a ``K < N`` from ``choices`` (default :attr:`valid`).

        Raises:
          ValueError: not even the smallest ``K`` fits; the message gives its predicted peak and the fixed bytes.
        """
        budget = int(budget_bytes)
        ks = sorted(set(self.valid if choices is None else (int(k) for k in choices)) & set(self.valid))
        if not ks:
            raise ValueError(f"batch_for: none of the member_batch choices {list(choices)} is valid; valid values: "
                             f"{_members._listing(list(self.valid))}")
        if ks[-1] == self.population_size and self.peak_bytes(None) <= budget:
            return None
        fits = [k for k in ks if k < self.population_size and self.peak_bytes(k) <= budget]
        if not fits:
            k = ks[0]
            raise ValueError(
                f"memory budget {format_bytes(budget)} ({budget} bytes) is below the predicted peak "
                f"{format_bytes(self.peak_bytes(k))} of the smallest member_batch={k} (fixed "
                f"{format_bytes(self.fixed_bytes)}: the state, data and outputs; evaluation "
                f"{format_bytes(self.eval_bytes_per_member)} and update {format_bytes(self.update_bytes_per_member)}"
                " per member); raise the budget or shrink the model, the data or the population")
        return fits[-1]

    def summary(self, member_batch: int | None = None, budget_bytes: int | None = None) -> dict:
        """The estimate as a JSON-able dict (what the runner writes to ``summary.json``), with the predicted peak
        of ``member_batch`` and the budget."""
        return {"member_batch": member_batch, "budget_bytes": budget_bytes,
                "predicted_peak_bytes": self.peak_bytes(member_batch), "fixed_bytes": int(self.fixed_bytes),
                "eval_bytes_per_member": float(self.eval_bytes_per_member),
                "update_bytes_per_member": float(self.update_bytes_per_member),
                "eval_temp_bytes": int(self.eval_temp_bytes), "update_temp_bytes": int(self.update_temp_bytes),
                "unbatched_bytes": self.unbatched_bytes, "population_size": self.population_size,
                "samples": [list(s) for s in self.samples]}

    def describe(self, member_batch: int | None = None, budget_bytes: int | None = None) -> str:
        """One line: bytes per member of evaluation and update, the chosen ``member_batch``, the predicted peak."""
        k = "none (all members at once)" if member_batch is None else str(member_batch)
        budget = "" if budget_bytes is None else f" (budget {format_bytes(budget_bytes)})"
        return (f"memory: {format_bytes(self.eval_bytes_per_member)}/member evaluation, "
                f"{format_bytes(self.update_bytes_per_member)}/member update, fixed {format_bytes(self.fixed_bytes)}"
                f"; member_batch={k}: predicted peak {format_bytes(self.peak_bytes(member_batch))}{budget}, "
                f"unbatched {format_bytes(self.peak_bytes(None))}")

    def _k(self, member_batch: int | None) -> int:
        return self.population_size if member_batch is None else int(member_batch)


def _sample_batches(valid: list[int], n: int) -> tuple[int, int] | None:
    """The two batched ``K`` compiled for the fit: the largest proper one and the largest at most half of it (the
    unbatched ``N`` as the second point when there is only one proper value; ``None`` when there is none)."""
    proper = [k for k in valid if k < n]
    if not proper:
        return None
    hi = proper[-1]
    lower = [k for k in proper if 2 * k <= hi]
    return (lower[-1], hi) if lower else (hi, n)


def _phase_bytes(compiled) -> tuple[int, int]:
    """``(temporaries, arguments + outputs - aliased)`` of a compiled program."""
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError("memory_estimate: this backend's compiled programs give no memory_analysis()")
    return int(m.temp_size_in_bytes), int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def _tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def memory_estimate(strategy: Strategy, state: Any, fitness_fn: Any, key: jax.Array, data: Any = None, *,
                    data_per_group: bool = False, data_per_member: bool = False, has_aux: bool = False,
                    unbatched: bool = True) -> MemoryEstimate:
    """The bytes of one generation (``evaluate`` then ``tell``) as a function of ``member_batch``.

    Args:
      strategy: an esx strategy (``eggroll``, ``open_es``, ``make_strategy``, ``int_eggroll``); its own
        ``member_batch`` does not matter (:func:`with_member_batch` rebuilds it for each ``K``).
      state: its :class:`esx.State` (arrays, or ``jax.ShapeDtypeStruct`` leaves: only shapes are used).
      fitness_fn, key, data, data_per_group, data_per_member, has_aux: as for ``strategy.evaluate`` (``data`` may
        hold ``jax.ShapeDtypeStruct`` leaves too).
      unbatched: also compile the unbatched programs (their peak is then measured, not extrapolated).

    Returns:
      a :class:`MemoryEstimate`; ``estimate.batch_for(budget_bytes)`` picks ``member_batch``.
    """
    cfg = strategy.config
    n = cfg.population_size
    valid = [d for d in _members._divisors(n) if d % (2 if cfg.antithetic else 1) == 0]
    options = dict(data_per_group=data_per_group, data_per_member=data_per_member, has_aux=has_aux)
    state_bytes = _tree_bytes(state)

    def measure(k: int | None) -> tuple[int, int, int]:
        """``(K, eval temporaries, update temporaries, fixed bytes)`` of the programs with ``member_batch=k``."""
        s = with_member_batch(strategy, k)

        def evaluate(state, key, data):
            return s.evaluate(state, fitness_fn, key, data, **options)

        out = jax.eval_shape(evaluate, state, key, data)
        fit = out[0] if has_aux else out
        fitness = jax.ShapeDtypeStruct(fit.shape, fit.dtype)
        ev_temp, ev_io = _phase_bytes(jax.jit(evaluate, keep_unused=True).lower(state, key, data).compile())
        up_temp, up_io = _phase_bytes(jax.jit(s.tell, keep_unused=True).lower(state, fitness).compile())
        # held through the whole generation: the state and the new state, the data and key, the fitness vector
        # and the aux outputs (the state is an argument of both programs, the fitness an output of one and an
        # argument of the other: counted once each)
        fixed = ev_io + up_io - state_bytes - _tree_bytes(fitness)
        return (n if k is None else k, ev_temp, up_temp, fixed)

    picks = _sample_batches(valid, n)
    samples = [measure(None if k == n else k) for k in (picks or ())]
    full = None
    if unbatched or picks is None:
        full = next((s for s in samples if s[0] == n), None) or measure(None)
        if full not in samples:
            samples.append(full)
    fixed = max(s[3] for s in samples)
    if picks is None:   # N is the only valid K: the one chunk's temporaries are all "per member"
        (_, et, ut, _), = samples
        e_slope, u_slope, e0, u0 = et / n, ut / n, 0.0, 0.0
    else:
        (k1, et1, ut1, _), (k2, et2, ut2, _) = samples[0], samples[1]
        e_slope = max((et2 - et1) / (k2 - k1), 0.0)
        u_slope = max((ut2 - ut1) / (k2 - k1), 0.0)
        e0, u0 = max(et1 - e_slope * k1, 0.0), max(ut1 - u_slope * k1, 0.0)
    return MemoryEstimate(
        population_size=n, valid=tuple(valid), fixed_bytes=int(fixed),
        eval_bytes_per_member=float(e_slope), update_bytes_per_member=float(u_slope),
        eval_temp_bytes=int(math.ceil(e0)), update_temp_bytes=int(math.ceil(u0)),
        unbatched_bytes=None if full is None else int(full[3] + max(full[1], full[2])),
        samples=tuple((int(k), int(e), int(u)) for k, e, u, _ in sorted(samples)))
