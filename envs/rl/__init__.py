"""esx_envs.rl: RL fitness for esx -- episode return of an MLP policy in any JAX environment behind the
:class:`Adapter` shape, and the ``rl`` task of ``esx train``.

* :mod:`esx_envs.rl.adapters` -- :class:`Adapter` (the environment shape), :class:`Gymnax` (any gymnax environment
  by name), :func:`make_adapter`, :data:`ADAPTERS` (other suites by name prefix: :mod:`esx_envs.rl.jumanji`,
  :mod:`~esx_envs.rl.brax`, :mod:`~esx_envs.rl.craftax`, :mod:`~esx_envs.rl.navix`, :mod:`~esx_envs.rl.kinetix`,
  each behind its extra ``rl-<suite>``);
* :mod:`esx_envs.rl.paper` -- the paper's 16 environments as named configs (``esx train brax-ant``);
* :mod:`esx_envs.rl.policy` -- :class:`Policy`, an MLP written with :func:`esx.dense` / :func:`esx.value` (hidden
  layers ``dense -> LayerNorm -> ReLU``, as in the paper), in a vector and a per-unit form;
* :mod:`esx_envs.rl.rollout` -- :func:`rollout`, :func:`make_fitness` (``(member_view, key, obs_stats) -> (mean
  return, ObsMoments)``), :func:`make_evaluator`, observation statistics (:class:`ObsStats`);
* :mod:`esx_envs.rl.task` -- :class:`RLConfig` and its :class:`esx.run.Setup` (``esx train cartpole``).

Example::

    adapter = rl.Gymnax("CartPole-v1")
    policy = rl.Policy.for_adapter(adapter, width=32, depth=2)
    fitness = rl.make_fitness(adapter, policy, episodes=2)
    strategy = esx.eggroll(population_size=256, rank=4, sigma=0.2, optimizer=optax.sgd(0.1))
    state = strategy.init(jax.random.key(0), policy.init(jax.random.key(1)))
    stats = rl.ObsStats.create(adapter.observation_shape)
    returns, moments = strategy.evaluate(state, fitness, jax.random.key(2), stats, has_aux=True)
    state, metrics = strategy.tell(state, returns)
    stats = rl.update_obs_stats(stats, moments)
"""
from esx_envs.rl.adapters import ADAPTERS, OBS_FROM_STATE, ActionKind, Adapter, Gymnax, gymnax_env_names, \
    make_adapter
from esx_envs.rl.policy import ActionMode, Policy
from esx_envs.rl.rollout import ObsMoments, ObsStats, make_evaluator, make_fitness, rollout, update_obs_stats
from esx_envs.rl.task import RLConfig, RLParts, evaluate_run, rl_setup

__all__ = ["ADAPTERS", "OBS_FROM_STATE", "ActionKind", "ActionMode", "Adapter", "Gymnax", "ObsMoments", "ObsStats",
           "Policy", "RLConfig", "RLParts", "evaluate_run", "gymnax_env_names", "make_adapter", "make_evaluator",
           "make_fitness", "rl_setup", "rollout", "update_obs_stats"]
