"""EGGROLL (esx) vs evosax ``Open_ES`` on a gymnax task, side by side in one process.

Both train the same policy (an MLP ``obs -> width (x depth) -> actions``, ReLU, LayerNorm only with
``--layer-norm``: same parameters, same function) with the same rollout code (``esx_envs.rl``), population, σ,
optimizer and fitness shaping (centered ranks); the perturbation differs: EGGROLL's rank-r ``A Bᵀ`` applied inside
a shared forward, vs Open_ES's full-rank noise vector per member. Open_ES's per-member forward is computed in one of
two ways:

* ``flax``: each layer by ``flax.linen.Dense``, as ``evosax.problems.networks.MLP`` builds it (Open_ES as evosax
  users run it; the ``vector`` form of ``rl.Policy`` with Flax's product);
* ``esx``: by ``rl.Policy`` itself, the code EGGROLL uses, including its ``"units"`` form for tiny policies on CPU
  (a per-unit elementwise forward, see ``rl.Policy``) -- the method-only comparison.

It prints
1. throughput: generations per second with every episode run for exactly ``--steps`` steps (no early stop), timed
   alternately (A, B, C, A, B, C, ...) so that machine noise hits all alike, and the ratios of EGGROLL to each
   Open_ES (``--breakdown`` adds the time of each part: one shared policy's rollouts, each side's evaluation, ask
   and tell, with ``--open-es-policy``'s forward);
2. learning (Open_ES with ``--open-es-policy``'s forward, default ``flax``): wall-clock (each method's
   compilation included; the greedy check is compiled before both races)
   until the greedy policy's mean return over 32 episodes reaches ``--target`` (checked every 5 generations), or
   the value reached when ``--time-limit`` runs out; then both final policies are scored on the same
   ``--final-episodes`` seeds, and the mean of the per-seed differences is printed with its standard error.
   ``--lr-schedule cosine`` anneals both methods' learning rate by the same cosine of the race's wall-clock time.

    python scripts/compare_evosax_cartpole.py                         # CartPole-v1, N=4096, 200 steps
    python scripts/compare_evosax_cartpole.py --mode greedy --noise-source hash   # argmax actions, hash noise
    # Pendulum-v1 with the named config `pendulum` (esx_envs/configs.py): N=512, rank 4, σ 0.05, Adam 0.01, 2x64 MLP
    # with LayerNorm, 2 greedy episodes per member; a fixed 15-minute budget per method (target inf: never stops early)
    python scripts/compare_evosax_cartpole.py --env Pendulum-v1 --population 512 --rank 4 --sigma 0.05 \\
        --optimizer adam --lr 0.01 --width 64 --depth 2 --layer-norm --episodes 2 --mode greedy \\
        --target inf --time-limit 900 --log-every 60 --final-episodes 1024
    # the same with the paper's policy size (3x256, LayerNorm then ReLU): Open_ES's per-member weights grow with it
    python scripts/compare_evosax_cartpole.py --env Pendulum-v1 --population 512 --rank 4 --sigma 0.05 \\
        --optimizer adam --lr 0.01 --width 256 --depth 3 --layer-norm --episodes 2 --mode greedy \\
        --target inf --time-limit 900 --log-every 60 --final-episodes 1024
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--population", type=int, default=4096)
    p.add_argument("--steps", type=int, default=200, help="episode step limit")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=1, help="hidden layers")
    p.add_argument("--layer-norm", action="store_true", help="LayerNorm before each ReLU (the named configs' MLP)")
    p.add_argument("--episodes", type=int, default=1, help="episodes per member per generation, averaged")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--sigma", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: in the learning race both methods' learning rate is lr * (1 + cos(pi * t / T)) / 2, "
                        "t the race's wall-clock seconds so far (compilation included), T = --time-limit: the same "
                        "schedule in seconds for both, so the faster method takes more, smaller steps; set on the "
                        "host every 5 generations through optax.inject_hyperparams (the throughput part uses lr)")
    p.add_argument("--noise-source", default="normal",
                   help="EGGROLL's noise source, one of esx.noise.NOISE_SOURCES (default normal)")
    p.add_argument("--mode", choices=["greedy", "stochastic"], default="stochastic")
    p.add_argument("--throughput-gens", type=int, default=6, help="timed generations per method")
    p.add_argument("--target", type=float, default=475.0)
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds per method for the learning race")
    p.add_argument("--log-every", type=float, default=0.0,
                   help="print the race's progress (time, generation, greedy return) every this many seconds")
    p.add_argument("--final-episodes", type=int, default=128,
                   help="greedy episodes (same seeds for both) that score each method's final policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput-only", action="store_true", help="measure generations/s only (no learning race)")
    p.add_argument("--open-es-policy", choices=["esx", "flax"], default="flax",
                   help="Open_ES's per-member forward in the learning race and --breakdown: flax.linen.Dense "
                        "layers, as evosax.problems.networks.MLP does (default: Open_ES as evosax users run it) or "
                        "esx's rl.Policy, the same code as EGGROLL's forward (same parameters, same values); the "
                        "throughput part always measures both")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of a generation (shared-policy rollout, each side's evaluation, "
                        "ask and tell), interleaved, median of --throughput-gens calls each")
    args = p.parse_args(argv)

    import evosax.algorithms as ea

    import esx
    from esx_envs import rl

    adapter = rl.make_adapter(args.env, max_steps=args.steps)
    race_adapter = rl.make_adapter(args.env)  # the environment's own step limit (500 for CartPole-v1)
    policy = rl.Policy.for_adapter(adapter, width=args.width, depth=args.depth, layer_norm=args.layer_norm)
    params0 = policy.init(jax.random.key(args.seed))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params0))
    stats = rl.ObsStats.create(adapter.observation_shape)
    # Open_ES's policies: the same parameters and function; rl.Policy's own forward, or flax.linen.Dense layers.
    flax_policy = FlaxPolicy(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)})
    evo_policies = {"flax": flax_policy, "esx": policy}
    evo_policy = evo_policies[args.open_es_policy]
    opt = optax.sgd if args.optimizer == "sgd" else optax.adam
    scheduled = args.lr_schedule != "constant"
    # With a schedule the learning rate lives in the optimizer state (optax.inject_hyperparams) and each
    # generation sets it; otherwise the plain optimizer, and the `lr` argument of the generation is ignored.
    opt = optax.inject_hyperparams(opt)(learning_rate=args.lr) if scheduled else opt(args.lr)
    with_lr = set_learning_rate if scheduled else (lambda opt_state, lr: opt_state)
    evaluate_greedy = rl.make_evaluator(race_adapter, policy, episodes=32)
    evaluate_final = rl.make_evaluator(race_adapter, policy, episodes=args.final_episodes)
    sizes = "->".join(str(d) for d in [policy.obs_size] + [args.width] * args.depth + [policy.action_dim])
    print(f"{args.env}: MLP {sizes}{' with LayerNorm' if args.layer_norm else ''} ({n_params} parameters), "
          f"N={args.population}, {args.steps} steps, {args.episodes} episode(s) per member, {args.mode} actions, "
          f"σ={args.sigma}, {args.optimizer} lr={args.lr}"
          f"{' (cosine to 0 over the race time limit, in seconds)' if scheduled else ''}, EGGROLL rank {args.rank}; "
          f"rl.Policy form {policy.resolved_form!r}; devices {jax.devices()}")

    # --- EGGROLL -------------------------------------------------------------------------------------------------
    strategy = esx.eggroll(population_size=args.population, rank=args.rank, sigma=args.sigma, optimizer=opt,
                           noise_source=args.noise_source)

    def make_egg_gen(stop_early):
        fitness = rl.make_fitness(race_adapter if stop_early else adapter, policy, mode=args.mode,
                                  episodes=args.episodes, stop_early=stop_early)

        @jax.jit
        def gen(state, lr):
            state = state.replace(opt_state=with_lr(state.opt_state, lr))
            key = jax.random.fold_in(jax.random.key(args.seed + 1), state.generation)
            f, _ = strategy.evaluate(state, fitness, key, stats, has_aux=True)
            return strategy.tell(state, f)

        return gen

    # --- evosax Open_ES (minimises: it gets -return) -------------------------------------------------------------
    es = ea.Open_ES(population_size=args.population, solution=params0, optimizer=opt,
                    std_schedule=optax.constant_schedule(args.sigma))
    es_params = es.default_params

    def make_evo_gen(stop_early, which=args.open_es_policy):
        fitness = rl.make_fitness(race_adapter if stop_early else adapter, evo_policies[which], mode=args.mode,
                                  episodes=args.episodes, stop_early=stop_early)

        @jax.jit
        def gen(carry, lr):
            state, g = carry
            state = state.replace(opt_state=with_lr(state.opt_state, lr))
            key = jax.random.fold_in(jax.random.key(args.seed + 1), g)
            k_ask, k_eval, k_tell = jax.random.split(key, 3)
            population, state = es.ask(k_ask, state, es_params)
            keys = jax.random.split(k_eval, args.population)
            f, _ = jax.vmap(lambda prm, k: fitness(prm, k, stats))(population, keys)
            state, _ = es.tell(k_tell, population, -f, state, es_params)
            return state, g + 1

        return gen

    def evo_init():
        return es.init(jax.random.key(args.seed), params0, es_params), jnp.int32(0)

    def evo_mean(carry):
        return es.get_mean(carry[0]) if hasattr(es, "get_mean") else es._unravel_solution(carry[0].mean)

    def egg_init():
        return strategy.init(jax.random.key(args.seed), params0)

    # 1. throughput at a fixed cost per generation ------------------------------------------------------------------
    gens = {"esx EGGROLL": (make_egg_gen(False), egg_init),
            "evosax Open_ES, flax MLP": (make_evo_gen(False, "flax"), evo_init),
            "evosax Open_ES, esx policy": (make_evo_gen(False, "esx"), evo_init)}
    states, compile_s, times = {}, {}, {name: [] for name in gens}

    def call(name, state):
        out = gens[name][0](state, args.lr)
        return jax.block_until_ready(out[0] if name == "esx EGGROLL" else out)

    for name, (_, init) in gens.items():
        t = time.perf_counter()
        states[name] = call(name, init())
        compile_s[name] = time.perf_counter() - t
    # one more untimed call each: a state whose leaves change type after the first step (evosax's counters start as
    # Python numbers) recompiles once on the second call, which is not throughput
    for name in gens:
        states[name] = call(name, states[name])
    for _ in range(args.throughput_gens):
        for name in gens:
            t = time.perf_counter()
            states[name] = call(name, states[name])
            times[name].append(time.perf_counter() - t)
    gps = {name: 1 / np.median(ts) for name, ts in times.items()}
    print(f"\nthroughput ({args.steps}-step episodes, median of {args.throughput_gens} alternating generations):")
    for name in gens:
        print(f"  {name:<28} {gps[name]:7.2f} gen/s   (first call incl. compile {compile_s[name]:.1f} s)")
    egg_gps = gps["esx EGGROLL"]
    print(f"  ratio EGGROLL / Open_ES (flax MLP, as evosax users run it):        "
          f"{egg_gps / gps['evosax Open_ES, flax MLP']:.2f}x")
    print(f"  ratio EGGROLL / Open_ES (esx policy, the same forward code):       "
          f"{egg_gps / gps['evosax Open_ES, esx policy']:.2f}x")
    egg_state = states["esx EGGROLL"]
    evo_state = states[f"evosax Open_ES, {'flax MLP' if args.open_es_policy == 'flax' else 'esx policy'}"]
    if args.breakdown:
        breakdown(args, strategy, es, es_params, adapter, policy, evo_policy, stats, egg_state, evo_state[0])
    if args.throughput_only:
        return

    # 2. learning race ------------------------------------------------------------------------------------------------
    def race(name, init, gen, params_of, gen_of):
        t0 = time.perf_counter()
        state = init()
        g, value, best, next_log, lr = 0, -np.inf, -np.inf, args.log_every, args.lr
        while True:
            if scheduled:
                lr = cosine_lr(args.lr, time.perf_counter() - t0, args.time_limit)
            for _ in range(5):
                state = gen(state, lr)
                state = state[0] if name == "esx EGGROLL" else state
            g += 5
            value = float(evaluate_greedy(params_of(state), jax.random.key(g), stats).mean())
            best = max(best, value)
            elapsed = time.perf_counter() - t0
            if args.log_every > 0 and elapsed >= next_log:
                print(f"    {name:<16} {elapsed:7.1f} s  generation {g:5d}  greedy return {value:8.1f}  "
                      f"(best so far {best:.1f}){f'  lr {lr:.2e}' if scheduled else ''}", flush=True)
                next_log += args.log_every * (1 + (elapsed - next_log) // args.log_every)
            if value >= args.target or elapsed > args.time_limit:
                break
        reached = value >= args.target
        what = f"reached {value:.1f} >= {args.target:g}" if reached else f"greedy return {value:.1f} (not reached)"
        final = np.asarray(evaluate_final(params_of(state), jax.random.key(10**6 + args.seed), stats))
        print(f"  {name:<16} {what} after {g} generations, {elapsed:.1f} s (compile included); best check "
              f"{best:.1f}; final policy over {args.final_episodes} episodes: {final.mean():.1f} "
              f"± {final.std() / np.sqrt(final.size):.1f} (s.e.)", flush=True)
        return reached, elapsed, value, float(final.mean()), final

    print(f"\nlearning (greedy mean return over 32 episodes, target {args.target:g}, limit {args.time_limit:.0f} s "
          "each, episodes stop at termination):")
    # The 32-episode check is the referee, not part of either method: compile it before both races (otherwise the
    # first race, EGGROLL's, pays its compilation and the second reuses it).
    jax.block_until_ready(evaluate_greedy(params0, jax.random.key(0), stats))
    r_egg = race("esx EGGROLL", egg_init, make_egg_gen(True), lambda s: s.params, None)
    r_evo = race("evosax Open_ES", evo_init, make_evo_gen(True), evo_mean, None)
    if r_egg[0] and r_evo[0]:
        print(f"  wall-clock ratio Open_ES / EGGROLL: {r_evo[1] / r_egg[1]:.2f}x")
    else:
        print(f"  at the time limit: EGGROLL {r_egg[2]:.1f} vs Open_ES {r_evo[2]:.1f} (last 32-episode check); "
              f"final policies over {args.final_episodes} episodes: EGGROLL {r_egg[3]:.1f} vs Open_ES {r_evo[3]:.1f}")
    # The final scores use the same seeds (initial states) for both policies: the per-episode differences remove
    # the spread that comes from the initial state (large for Pendulum), so their standard error is the honest one.
    d = r_egg[4] - r_evo[4]
    print(f"  final policies, paired by episode seed (EGGROLL - Open_ES): {d.mean():+.2f} ± "
          f"{d.std(ddof=1) / np.sqrt(d.size):.2f} (s.e.); EGGROLL better in {int(np.sum(d > 0))}, worse in "
          f"{int(np.sum(d < 0))} of {d.size} episodes")


def cosine_lr(lr: float, elapsed: float, limit: float) -> float:
    """``lr * (1 + cos(pi * min(elapsed / limit, 1))) / 2``: ``lr`` at 0 s, ``lr / 2`` at half the limit, 0 after."""
    return lr * 0.5 * (1.0 + float(np.cos(np.pi * min(elapsed / limit, 1.0))))


def set_learning_rate(opt_state, lr):
    """``opt_state`` of an ``optax.inject_hyperparams(...)`` optimizer with its learning rate replaced by ``lr``
    (a float or a traced float32 scalar): the next update uses it, with the moments (e.g. Adam's) untouched."""
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})


def breakdown(args, strategy, es, es_params, adapter, policy, evo_policy, stats, egg_state, evo_state) -> None:
    """Times the parts of one generation on the throughput setting (fixed-length episodes)."""
    from esx_envs import rl

    n = args.population
    fitness = rl.make_fitness(adapter, policy, mode=args.mode, episodes=args.episodes, stop_early=False)
    evo_fitness = rl.make_fitness(adapter, evo_policy, mode=args.mode, episodes=args.episodes, stop_early=False)
    zeros = jnp.zeros(n)
    parts = {
        "shared policy, N rollouts": (jax.jit(lambda s, k: jax.vmap(lambda kk: fitness(s.params, kk, stats)[0])(
            jax.random.split(k, n))), egg_state),
        "esx evaluate": (jax.jit(lambda s, k: strategy.evaluate(s, fitness, k, stats, has_aux=True)[0]), egg_state),
        "esx tell": (jax.jit(lambda s, k: strategy.tell(s, zeros + jax.random.normal(k, (n,)))[0].params),
                     egg_state),
        "evosax ask": (jax.jit(lambda s, k: es.ask(k, s, es_params)[0]), evo_state),
        "evosax ask + evaluate": (jax.jit(lambda s, k: jax.vmap(lambda p, kk: evo_fitness(p, kk, stats)[0])(
            es.ask(k, s, es_params)[0], jax.random.split(k, n))), evo_state),
        "evosax ask + tell": (jax.jit(lambda s, k: es.tell(k, es.ask(k, s, es_params)[0],
                                                           zeros + jax.random.normal(k, (n,)), s, es_params)[0]),
                              evo_state),
    }
    key = jax.random.key(3)
    for f, state in parts.values():
        jax.block_until_ready(f(state, key))
    times = {name: [] for name in parts}
    for _ in range(args.throughput_gens):
        for name, (f, state) in parts.items():
            t = time.perf_counter()
            jax.block_until_ready(f(state, key))
            times[name].append(time.perf_counter() - t)
    print(f"\nparts of a generation (median of {args.throughput_gens} interleaved calls, ms):")
    for name, ts in times.items():
        print(f"  {name:<26} {1e3 * np.median(ts):7.1f}   (min {1e3 * min(ts):.1f})")


@functools.lru_cache(maxsize=None)
def _flax_policy_class():
    import flax.linen as nn

    from esx_envs import rl

    class FlaxPolicy(rl.Policy):
        """:class:`esx_envs.rl.Policy` with each layer's product ``x @ w`` computed by ``flax.linen.Dense`` (as
        ``evosax.problems.networks.MLP`` builds its layers) instead of :func:`esx.dense`: plain weights only."""

        def product(self, x, w):
            return nn.Dense(w.shape[-1], use_bias=False).apply({"params": {"kernel": w}}, x)

    return FlaxPolicy


def FlaxPolicy(**fields):  # noqa: N802 -- builds the class on first use (flax is imported only for this option)
    """An ``rl.Policy`` with ``fields`` whose layers are ``flax.linen.Dense`` (always the ``"vector"`` form)."""
    return _flax_policy_class()(**{**fields, "form": "vector"})


if __name__ == "__main__":
    main()
