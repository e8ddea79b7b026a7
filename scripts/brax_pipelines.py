"""Times Brax's four physics pipelines on one environment (default Ant): compile time, then the time of a jitted
``lax.scan`` of vmapped steps, reported per environment step. Used to choose ``esx_envs.rl.brax.DEFAULT_BACKEND``
(docs/rl.md, "More suites").

    python3 scripts/brax_pipelines.py spring 64 50     # backend, batch of environments, steps
"""
import argparse
import time
import warnings

warnings.filterwarnings("ignore")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", choices=["generalized", "positional", "spring", "mjx"])
    p.add_argument("batch", type=int)
    p.add_argument("steps", type=int, nargs="?", default=20)
    p.add_argument("--env", default="ant")
    a = p.parse_args()
    from brax import envs

    env = envs.get_environment(a.env, backend=a.backend)
    keys = jax.random.split(jax.random.key(0), a.batch)

    def run(keys):
        s = jax.vmap(env.reset)(keys)

        def body(s, t):     # a fixed smooth action sequence, the same for every environment
            act = jnp.sin(t * 0.1 + jnp.arange(env.action_size)) * jnp.ones((a.batch, 1))
            s = jax.vmap(env.step)(s, act)
            return s, s.reward

        s, r = jax.lax.scan(body, s, jnp.arange(a.steps, dtype=jnp.float32))
        return r.sum()

    f = jax.jit(run)
    t = time.perf_counter()
    f(keys).block_until_ready()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(3):
        t = time.perf_counter()
        f(keys).block_until_ready()
        times.append(time.perf_counter() - t)
    best = min(times)
    print(f"{a.backend} batch={a.batch} steps={a.steps} compile+first={compile_s:.1f}s run={best:.3f}s "
          f"per_env_step={best / (a.batch * a.steps) * 1e6:.1f}us per_batched_step={best / a.steps * 1e3:.2f}ms",
          flush=True)


if __name__ == "__main__":
    main()
