"""From the installed wheel: Flax linen, Flax NNX, Equinox and evosax code trains with EGGROLL through esx.interop.

Run by .ci/wheel_check.sh in a fresh venv (extras rl,interop), outside the checkout. Each framework fits
y = sin(2x) with an unchanged model for 60 generations and must reach a quarter of its starting loss; evosax's own
ask/tell loop must do the same on a quadratic. Prints one line per framework.
"""
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from evosax.algorithms import Open_ES  # noqa: F401  (the class an evosax user swaps out)
from flax import nnx

import esx
import esx.interop.equinox as esx_eqx
import esx.interop.linen as esx_linen
import esx.interop.nnx as esx_nnx
from esx.interop.evosax import EGGROLL

warnings.simplefilter("error", esx_linen.MaterializeWarning)   # every layer here must run low-rank
X = jnp.linspace(-1.5, 1.5, 32)[:, None]
Y = jnp.sin(2 * X)
STRATEGY = dict(population_size=64, rank=2, sigma=0.03, optimizer=optax.adam(0.03))


def train(params, labels, predict, name):
    strategy = esx.eggroll(**STRATEGY, labels=labels)
    state = strategy.init(jax.random.key(1), params)
    mse = lambda view, key, data: jnp.mean((predict(view, data) - Y) ** 2)  # noqa: E731
    step = strategy.make_step(esx.minimize(mse))
    start = float(mse(params, None, X))
    for g in range(60):
        state, _ = step(state, jax.random.key(g), X)
    end = float(mse(state.params, None, X))
    print(f"{name}: mse {start:.4f} -> {end:.4f}")
    assert end < 0.25 * start, (name, start, end)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


linen_model = LinenMLP()
variables = linen_model.init(jax.random.key(0), X)
train(variables, esx_linen.labels(linen_model, variables, X),
      lambda view, x: esx_linen.apply(linen_model, view, x), "linen")


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(1, 16, rngs=rngs), nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.tanh(self.l1(x)))


nnx_model = NNXMLP(nnx.Rngs(0))
graphdef, params, rest = esx_nnx.split(nnx_model)
train(params, esx_nnx.labels(nnx_model), lambda view, x: esx_nnx.merge(graphdef, view, rest)(x), "nnx")

eqx_model = eqx.nn.MLP(1, 1, width_size=16, depth=1, activation=jnp.tanh, key=jax.random.key(0))
eqx_params, static = esx_eqx.partition(eqx_model)
train(eqx_params, esx_eqx.labels(eqx_params),
      lambda view, x: jax.vmap(esx_eqx.combine(view, static))(x), "equinox")

target = jnp.arange(12.0).reshape(3, 4) / 10
es = EGGROLL(population_size=32, solution=jnp.zeros((3, 4)), sigma=0.05, optimizer=optax.adam(0.05), rank=1)
es_params = es.default_params
es_state = es.init(jax.random.key(0), jnp.zeros((3, 4)), es_params)
loss = lambda w: jnp.sum((w - target) ** 2)  # noqa: E731
start = float(loss(es.get_mean(es_state)))
key = jax.random.key(1)
for _ in range(60):
    key, k_ask, k_tell = jax.random.split(key, 3)
    population, es_state = es.ask(k_ask, es_state, es_params)
    es_state, _ = es.tell(k_tell, population, jax.vmap(loss)(population), es_state, es_params)
end = float(loss(es.get_mean(es_state)))
print(f"evosax: loss {start:.4f} -> {end:.4f}")
assert end < 0.25 * start, (start, end)
