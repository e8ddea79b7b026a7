"""esx: EGGROLL low-rank evolution strategies in JAX.

The public API (everything else is internal):

* strategies: :func:`eggroll`, :func:`open_es` (and the integer :mod:`esx.int_eggroll` for int8 models)
  -> :class:`Strategy` (``init / ask / view / evaluate / tell``),
  the free :func:`step` (or ``strategy.make_step(fitness)``), the state :class:`State` and :class:`Metrics`;
  esx maximises the fitness: wrap a loss with :func:`minimize`;
* model-side ops: :func:`dense`, :func:`embed`, :func:`value` and the perturbed leaves :class:`LowRank`,
  :class:`Full`; :func:`prepare` resolves a member view once before a loop (leaves :class:`SplitLowRank`);
* :mod:`esx.shaping` (fitness is higher-is-better), :mod:`esx.labels`, :mod:`esx.noise`;
* :func:`anchored_weight_decay` and :func:`scale_by_path` (:mod:`esx.transforms`): optax transforms that pull the
  parameters toward their initial values and scale each leaf's step by a per-path factor;
* :func:`memory_estimate` (:mod:`esx.memory`): the bytes of a generation per ``member_batch``, and the largest
  ``member_batch`` that fits a budget; :func:`with_member_batch` rebuilds a strategy with another one;
* member views support ``x @ w`` / ``w @ x`` / ``w.T`` (low-rank) and refuse other arithmetic; Flax, Equinox
  and evosax code runs through :mod:`esx.interop` (imported on its own: ``import esx`` never loads them).

Only jax, optax and numpy are imported here.
"""
from esx import int_eggroll, labels, memory, noise, shaping, transforms
from esx.base import Config, Metrics, Population, State, Strategy, minimize, paper_learning_rate, step
from esx.memory import MemoryEstimate, memory_estimate, with_member_batch
from esx.eggroll import eggroll
from esx.labels import FROZEN, FULL, LOWRANK, make_labels
from esx.open_es import open_es
from esx.transforms import anchored_weight_decay, scale_by_path
from esx.ops import Full, LowRank, SplitLowRank, dense, embed, prepare, value

__version__ = "0.1.0"

__all__ = [
    "Config", "FROZEN", "FULL", "Full", "LOWRANK", "LowRank", "MemoryEstimate", "Metrics", "Population",
    "SplitLowRank", "State", "Strategy", "anchored_weight_decay", "dense", "eggroll", "embed", "int_eggroll",
    "labels", "make_labels", "memory", "memory_estimate", "minimize", "noise", "open_es", "paper_learning_rate",
    "prepare", "scale_by_path", "shaping", "step", "transforms", "value", "with_member_batch",
]
