"""Golden runs: sha256 digests of the final state of short fixed-seed runs (see tests/test_golden.py).

Run as a script to print the digests as JSON: ``python tests/_golden_runs.py [case ...]``. The ``sharded`` case
needs 4 host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``, set before JAX starts).
"""
from __future__ import annotations

import hashlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import esx


def digest(tree) -> str:
    """sha256 over every leaf of ``tree`` (PRNG keys as their key data): shape, dtype and bytes."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.asarray(leaf)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _quickstart():
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}

    def fitness(p, key, data):
        y = esx.dense(data, p["w"]) + esx.value(p["b"])
        return -jnp.sum((y - 1.0) ** 2)

    return params, fitness, jnp.ones((4, 3))


def step_eggroll() -> str:
    params, fitness, x = _quickstart()
    strategy = esx.eggroll(population_size=64, rank=2, sigma=0.1, optimizer=optax.adam(0.05))
    state = strategy.init(jax.random.key(0), params)
    for g in range(20):
        state, _ = esx.step(strategy, state, fitness, jax.random.key(g), x)
    return digest(state)


def step_open_es() -> str:
    params, fitness, x = _quickstart()
    strategy = esx.open_es(population_size=64, sigma=0.1, optimizer=optax.sgd(0.05), shaping="z_score")
    state = strategy.init(jax.random.key(0), params)
    for g in range(20):
        state, _ = esx.step(strategy, state, fitness, jax.random.key(g), x)
    return digest(state)


def step_int() -> str:
    params = {"w": jnp.zeros((8, 4), jnp.int8), "b": jnp.zeros((4,), jnp.int8)}

    def fitness(p, key, data):
        y = esx.int_eggroll.int_dense(data, p["w"]) + esx.int_eggroll.int_value(p["b"]).astype(jnp.int32)
        return -jnp.sum(jnp.abs(y - 20))

    x = jnp.full((2, 8), 16, jnp.int8)
    strategy = esx.int_eggroll.int_eggroll(population_size=32, sigma_shift=2, alpha=0.2)
    state = strategy.init(jax.random.key(0), params)
    tell = jax.jit(strategy.tell)
    evaluate = jax.jit(lambda s, k: strategy.evaluate(s, fitness, k, x))
    for g in range(6):
        state, _ = tell(state, evaluate(state, jax.random.key(g)))
    return digest(state)


def _train(name: str, **overrides) -> str:
    from esx import run
    from esx_envs import configs

    config = configs.apply_overrides(configs.get_config(name), overrides)
    result = run.train(config, None, progress=False, log=lambda s: None)
    return digest(result.state)


def train_cartpole() -> str:
    return _train("cartpole", generations=6, population_size=32, chunk=3, eval_every=3, eval_episodes=2,
                  final_eval_episodes=2, checkpoint_every=0)


def train_egg() -> str:
    return _train("egg-shakespeare", generations=3, dim=16, population_size=8, length=8, eval_every=3,
                  eval_streams=2, eval_length=32, final_eval_streams=64, chunk=1, checkpoint_every=0)


def train_llm() -> str:
    return _train("llm-tiny-digits", generations=2, population_size=8, group_size=2, prompts_per_member=1,
                  max_new_tokens=6, val_size=2, eval_every=2, checkpoint_every=0)


def sharded() -> str:
    from esx import distributed as dist

    params, fitness, x = _quickstart()
    strategy = esx.eggroll(population_size=64, rank=2, sigma=0.1, optimizer=optax.adam(0.05))
    state = strategy.init(jax.random.key(0), params)
    mesh = dist.make_mesh(jax.devices()[:4])
    for g in range(5):
        state, _ = dist.sharded_step(strategy, state, fitness, jax.random.key(g), x, mesh=mesh)
    return digest(dist.to_host(state))


CASES = {f.__name__: f for f in (step_eggroll, step_open_es, step_int, train_cartpole, train_egg, train_llm,
                                 sharded)}

if __name__ == "__main__":
    names = sys.argv[1:] or [n for n in CASES if n != "sharded"]
    print(json.dumps({n: CASES[n]() for n in names}))
