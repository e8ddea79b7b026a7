"""The RL task of ``esx train``: :class:`RLConfig` (kind ``"rl"``) and its :class:`esx.run.Setup`.

A generation evaluates every member on ``episodes`` episodes (environment seeds from stream ``data`` of the
generation; antithetic partners share them with ``share_env_seed``), updates the policy and, with ``obs_norm``,
the running observation statistics (the run's carried state). Evaluations are greedy returns of the unperturbed
policy (stream ``eval``); the final one, over ``final_eval_episodes`` episodes, is what ``esx eval`` repeats by
default (same keys, same number).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
import optax

import esx
from esx.noise import stream_key
from esx.run import ConfigError, MemoryPlan, RunConfig, RunState, Setup, choose_member_batch, chunk_capacity, \
    core_config, device_chunk, eval_key
from esx.run.config import check_member_batch, check_positive
from esx_envs.rl.adapters import make_adapter
from esx_envs.rl.policy import Policy
from esx_envs.rl.rollout import ObsStats, make_evaluator, make_fitness, update_obs_stats


@dataclasses.dataclass(frozen=True)
class RLConfig(RunConfig):
    """Everything that defines an RL training run (JSON-serialisable; saved with every checkpoint).

    Attributes (grouped; the run-control fields are :class:`esx.run.RunConfig`'s):
      env: a gymnax environment name (``"CartPole-v1"``, ``"Pendulum-v1"``, ``"Breakout-MinAtar"``, ...) or a
        prefixed name of another suite (``"jumanji:Snake-v1"``).
      strategy: ``"eggroll"`` (low-rank) or ``"open_es"`` (full-rank baseline).
      population_size, rank, sigma: ES population ``N`` (even), perturbation rank ``r``, noise scale ``σ``.
      optimizer, learning_rate: ``"sgd"``, ``"adam"`` or ``"adamw"`` (optax's default weight decay, 1e-4); the
        step on the textbook gradient estimate (see :func:`esx.paper_learning_rate` for the paper's convention:
        an SGD rate converts, an Adam / AdamW rate is the same in both, Adam being invariant to the gradient's
        scale).
      shaping: fitness shaping name (see :mod:`esx.shaping`).
      share_env_seed: antithetic partners see the same environment seeds (common random numbers).
      width, depth, layer_norm: the MLP policy (``depth`` hidden layers of ``width``, LayerNorm then ReLU).
      policy_form: how the policy's forward is written: ``"auto"``, ``"vector"`` or ``"units"`` (see
        :class:`esx_envs.rl.Policy`; ``"auto"`` writes policies of at most 256 multiply-adds per unit on CPU).
      episodes: episodes per member per generation, averaged.
      max_steps: episode step limit (``0``: the environment's default).
      action_mode: ``"stochastic"`` (sample the policy) or ``"greedy"`` while training; evaluation is greedy.
      action_std: exploration noise of stochastic continuous actions (fraction of the half-range).
      obs_norm: normalise observations with running statistics of the population's rollouts.
      eval_episodes: greedy episodes of each periodic evaluation of the unperturbed policy.
      final_eval_episodes: greedy episodes of the final evaluation (the reported number).
      target_return: stop once a greedy evaluation reaches this mean return (``None``: never).
      devices: shard the population over this many devices (``0``: all devices; see :mod:`esx.distributed`).
        Checkpoints do not depend on it: a run saved on 8 devices resumes on 1 and vice versa.
      placement: ``"gather"`` (every device contracts the full update from the gathered fitnesses) or
        ``"reduce"`` (partial updates summed: one parameter-sized all-reduce; equal up to rounding).
    """

    KIND: ClassVar[str] = "rl"
    RUN_CONTROL: ClassVar[frozenset] = RunConfig.RUN_CONTROL | {"target_return", "eval_episodes",
                                                                "final_eval_episodes", "devices", "placement"}

    env: str = "CartPole-v1"
    strategy: str = "eggroll"
    population_size: int = 256
    rank: int = 4
    sigma: float = 0.2
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    shaping: str = "centered_rank"
    share_env_seed: bool = True
    width: int = 32
    depth: int = 2
    layer_norm: bool = True
    policy_form: str = "auto"
    episodes: int = 1
    max_steps: int = 0
    action_mode: str = "stochastic"
    action_std: float = 0.1
    obs_norm: bool = False
    eval_episodes: int = 32
    final_eval_episodes: int = 100
    target_return: float | None = None
    devices: int = 1
    placement: str = "gather"

    def validate(self) -> None:
        super().validate()
        choices = {"strategy": ("strategies", ("eggroll", "open_es")),
                   "optimizer": ("optimizers", ("adam", "adamw", "sgd")),
                   "action_mode": ("modes", ("greedy", "stochastic")),
                   "policy_form": ("forms", ("auto", "units", "vector")),
                   "placement": ("placements", ("gather", "reduce"))}
        for name, (what, valid) in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name}={getattr(self, name)!r}; valid {what} are {list(valid)}")
        check_positive(self, ("population_size", "rank", "episodes", "eval_episodes", "final_eval_episodes"))
        if self.population_size % 2:
            raise ConfigError(f"population_size={self.population_size}; must be even (antithetic pairs)")
        if self.depth < 0 or self.width < 1:
            raise ConfigError(f"depth={self.depth}, width={self.width}; need depth >= 0 and width >= 1")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps={self.max_steps}; must be >= 0")
        if self.devices < 0:
            raise ConfigError(f"devices={self.devices}; must be >= 1, or 0 for all devices")
        if not self.sigma > 0 or not self.learning_rate > 0:
            raise ConfigError(f"sigma={self.sigma}, learning_rate={self.learning_rate}; both must be > 0")
        check_member_batch(self, self.population_size)

    def summary(self) -> str:
        return (f"{self.env}, {self.strategy} N={self.population_size} r={self.rank} σ={self.sigma} "
                f"{self.optimizer} lr={self.learning_rate}, MLP {self.depth}x{self.width}")

    def setup(self) -> Setup:
        """The :class:`esx.run.Setup` of this config (the expensive part is memoised on :func:`core_config`)."""
        return rl_setup(self)


class RLParts(NamedTuple):
    """The RL pieces of a :class:`esx.run.Setup` (``setup.parts``)."""

    adapter: Any
    policy: Policy
    fitness: Callable
    evaluator: Callable
    final_evaluator: Callable


def num_devices(config: RLConfig) -> int:
    """The number of devices the population is sharded over (``devices=0``: all); :class:`ConfigError` when
    there are fewer, or when the antithetic pairs do not divide evenly."""
    available = jax.device_count()
    n = available if config.devices == 0 else config.devices
    if n > available:
        raise ConfigError(f"devices={config.devices}; only {available} device(s) are available")
    pairs = config.population_size // 2
    if pairs % n:
        raise ConfigError(
            f"population_size={config.population_size} has {pairs} antithetic pairs, which is not divisible by "
            f"{n} devices; use a population_size that is a multiple of {2 * n} or another device count")
    return n


def rl_setup(config: RLConfig) -> Setup:
    """The :class:`esx.run.Setup` of an :class:`RLConfig`."""
    core = core_config(config)
    devices = num_devices(config)
    plan = _member_batch(config, core, devices)
    adapter, policy, strategy, fitness, run_chunk = _build(core, devices, config.placement, chunk_capacity(config),
                                                           plan.member_batch)
    evaluator = _evaluator(core, config.eval_episodes)
    final_evaluator = _evaluator(core, config.final_eval_episodes)

    def initial_state() -> RunState:
        run_key = jax.random.key(config.seed)
        params = policy.init(stream_key(run_key, "params"))
        es_state = strategy.init(stream_key(run_key, "noise"), params)
        return RunState(es_state, ObsStats.create(adapter.observation_shape), run_key)

    def evaluate(state: RunState, final: bool):
        if final:
            r = np.asarray(final_evaluator(state.es.params, final_eval_key(state), state.carry))
        else:
            r = np.asarray(evaluator(state.es.params, eval_key(state), state.carry))
        return {"eval_return_mean": float(r.mean()), "eval_return_std": float(r.std()),
                "eval_return_min": float(r.min())}, r

    return Setup(config, strategy, run_chunk, initial_state, evaluate, score="eval_return_mean",
                 higher_is_better=True, eval_at_start=False, target=config.target_return, fitness_name="return",
                 plot_keys=("return_mean", "return_max"), ylabel="episode return",
                 summary_extra={"final_eval_episodes": config.final_eval_episodes},
                 parts=RLParts(adapter, policy, fitness, evaluator, final_evaluator), memory=plan)


def _member_batch(config: RLConfig, core: RLConfig, devices: int):
    """The :class:`esx.run.MemoryPlan` of ``config.member_batch`` (``"auto"``: estimated on one device for the
    whole population, among the batches that split every device's share of pairs)."""
    if config.member_batch != "auto":
        return MemoryPlan(config.member_batch)
    adapter, policy, strategy, fitness, _ = _build(core, 1, "gather", 1, None)
    run_key = jax.random.key(config.seed)
    params = jax.eval_shape(policy.init, stream_key(run_key, "params"))
    state = jax.eval_shape(strategy.init, stream_key(run_key, "noise"), params)
    share = config.population_size // 2 // devices
    choices = [k for k in range(2, config.population_size + 1, 2)
               if config.population_size % k == 0 and (k // 2 >= share or share % (k // 2) == 0)]
    return choose_member_batch(config, strategy, state, fitness, stream_key(run_key, "data", 0),
                               ObsStats.create(adapter.observation_shape), choices=choices, has_aux=True)


def final_eval_key(state: RunState) -> jax.Array:
    """The key of the final evaluation at ``state``'s generation (what ``esx eval`` uses by default)."""
    return jax.random.fold_in(eval_key(state), 1)


@functools.lru_cache(maxsize=8)
def _evaluator(core: RLConfig, episodes: int) -> Callable:
    adapter, policy = _pieces(core)
    return make_evaluator(adapter, policy, episodes=episodes, obs_norm=core.obs_norm)


@functools.lru_cache(maxsize=8)
def _pieces(core: RLConfig):
    adapter = make_adapter(core.env, max_steps=core.max_steps or None)
    policy = Policy.for_adapter(adapter, width=core.width, depth=core.depth, layer_norm=core.layer_norm,
                                action_std=core.action_std, form=core.policy_form)
    return adapter, policy


@functools.lru_cache(maxsize=8)
def _build(config: RLConfig, devices: int = 1, placement: str = "gather", capacity: int = 10,
           member_batch: int | None = None):
    adapter, policy = _pieces(config)
    optimizer = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw}[config.optimizer](config.learning_rate)
    common = dict(population_size=config.population_size, sigma=config.sigma, optimizer=optimizer,
                  shaping=config.shaping, group_size=2 if config.share_env_seed else 1, member_batch=member_batch)
    if config.strategy == "eggroll":
        strategy = esx.eggroll(rank=config.rank, **common)
    else:
        strategy = esx.open_es(**common)
    fitness = make_fitness(adapter, policy, episodes=config.episodes, mode=config.action_mode,
                           obs_norm=config.obs_norm)
    mesh, step_strategy = None, strategy
    if devices > 1:
        from esx import distributed as dist

        mesh = dist.make_mesh(jax.devices()[:devices])
        # Collective evaluate/tell: members sharded over the mesh, fitnesses (and aux) gathered.
        step_strategy = dist.shard_strategy(strategy, placement=placement)

    def generation(state: RunState):
        key = stream_key(state.key, "data", state.es.generation)
        returns, moments = step_strategy.evaluate(state.es, fitness, key, state.carry, has_aux=True)
        es_state, metrics = step_strategy.tell(state.es, returns)
        stats = update_obs_stats(state.carry, moments) if config.obs_norm else state.carry
        return RunState(es_state, stats, state.key), metrics

    return adapter, policy, strategy, fitness, device_chunk(generation, capacity, mesh=mesh)


def evaluate_run(run_dir, *, episodes: int | None = None, seed: int | None = None) -> np.ndarray:
    """Greedy returns of the newest checkpoint of an RL run directory.

    With neither ``episodes`` nor ``seed`` this is the run's own final evaluation (the same ``final_eval_episodes``
    episodes with the same keys: the same number as ``summary.json``); with either, ``episodes`` (default 100)
    episodes from ``jax.random.key(seed)`` (default 12345).

    Returns:
      ``float[episodes]`` returns.
    """
    from esx.run import load_run

    setup, state = load_run(run_dir, default_kind="rl")
    if setup.config.KIND != "rl":
        raise ConfigError(f"{run_dir} is a {setup.config.KIND!r} run, not an RL run")
    if episodes is None and seed is None:
        return setup.evaluate(state, True)[1]
    evaluator = _evaluator(core_config(setup.config), 100 if episodes is None else episodes)
    return np.asarray(evaluator(state.es.params, jax.random.key(12345 if seed is None else seed), state.carry))


__all__ = ["RLConfig", "RLParts", "evaluate_run", "final_eval_key", "num_devices", "rl_setup"]
