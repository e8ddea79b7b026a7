"""GPU benchmark at the paper's setting (run by scripts/gpu_bench.sh; writes $OUT/gpu_bench.{json,txt}).

B1-GPU: one 8192×8192 bf16 layer, batch 1024 (one row per member), rank 1: inference time / EGGROLL population
forward time, noise drawn on the fly (``strategy.evaluate``) and pre-generated (``strategy.ask`` once, untimed; then
``strategy.view`` per member). Paper (GH200): 0.91 pre-generated, 0.69 on the fly.
B2-GPU: EGGROLL vs full-rank ES (esx.open_es, evosax Open_ES) on one 1024×1024 layer: time per generation.
B7-GPU: SmolLM2-135M population generation (N = B7_POP, default 4096; B7_MEMBER_BATCH) vs plain inference of the
same batch, member-tokens/s (esx_envs.bench.case_b7; target >= 0.9).
All ratios interleaved in one process (median over rounds).
"""
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

import esx
from esx_envs import bench

OUT = os.environ.get("OUT", ".")
REPEATS = int(os.environ.get("REPEATS", "15"))
CALLS = int(os.environ.get("CALLS", "20"))  # back-to-back dispatches per timing, so launch overhead is amortised
B2_POP = int(os.environ.get("B2_POP", "2048"))
WIDTH = int(os.environ.get("WIDTH", "8192"))
BATCH = int(os.environ.get("BATCH", "1024"))
lines = []


def say(s=""):
    print(s, flush=True)
    lines.append(s)


def layer(params, x):
    """x: bf16[WIDTH] -> f32[]: tanh of one dense layer (x @ W, bf16 matmul), then the mean."""
    return jnp.mean(jnp.tanh(esx.dense(x, params["w"])).astype(jnp.float32))


def b1(sources):
    key = jax.random.key(0)
    params = {"w": (jax.random.normal(key, (WIDTH, WIDTH), jnp.float32) / math.sqrt(WIDTH)).astype(jnp.bfloat16)}
    data = jax.random.normal(jax.random.key(2), (BATCH, WIDTH), jnp.float32).astype(jnp.bfloat16)
    fns = {}
    inference = jax.jit(lambda p, d: jax.vmap(lambda x: layer(p, x))(d))
    fns["inference"] = lambda: inference(params, data)
    fitness = lambda v, k, d: layer(v, d)  # noqa: E731
    for source in sources:
        strategy = esx.eggroll(population_size=BATCH, sigma=0.01, optimizer=optax.sgd(0.01), rank=1,
                               noise_source=source)
        state = strategy.init(jax.random.key(0), params)
        otf = jax.jit(lambda s, d, st=strategy: st.evaluate(s, fitness, jax.random.key(1), d, data_per_group=True))
        pre = jax.jit(lambda s, pop, d, st=strategy: jax.vmap(
            lambda m, x: layer(st.view(s, pop, m), x))(jnp.arange(BATCH, dtype=jnp.int32), d))
        pop = jax.block_until_ready(jax.jit(strategy.ask)(state))
        fns[f"{source}/on_the_fly"] = (lambda f=otf, s=state: f(s, data))
        fns[f"{source}/pregenerated"] = (lambda f=pre, s=state, p=pop: f(s, p, data))
    fns = {k: (lambda f=f: [f() for _ in range(CALLS)][-1]) for k, f in fns.items()}
    times = bench.time_interleaved(fns, repeats=REPEATS)
    ratios = {k: bench._ratio(times["inference"], v) for k, v in times.items() if k != "inference"}
    flops = 2 * BATCH * WIDTH * WIDTH
    measured = {f"{k}_s": bench._med(v) / CALLS for k, v in times.items()}
    measured["inference_tflops"] = flops / measured["inference_s"] / 1e12
    return {"config": {"layer": f"{WIDTH}x{WIDTH} bf16", "batch": BATCH, "rank": 1, "sources": sources,
                       "calls_per_timing": CALLS,
                       "paper": {"pregenerated": 0.91, "on_the_fly": 0.69}},
            "measured": measured, "ratios": ratios}


def main():
    t0 = time.time()
    meta = bench.environment()
    say(f"gpu_bench  device={meta['device']}  jax={meta['jax']}  python={meta['python']}")
    results = {"meta": meta, "cases": {}}
    sources = [s for s in os.environ.get("SOURCES", "hash,rademacher,normal").split(",") if s]
    try:
        res = b1(sources)
        results["cases"]["B1_gpu"] = res
        say("\n== B1 (paper setting) inference / population forward; paper: 0.91 pre-generated, 0.69 on the fly")
        for k, v in res["ratios"].items():
            say(f"   {k:<40} {v:8.3f}")
        for k, v in res["measured"].items():
            say(f"   . {k:<38} {v:10.5f}")
    except Exception as e:  # keep going to B2
        say(f"B1 failed: {type(e).__name__}: {e}")
    with open(os.path.join(OUT, "gpu_bench.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    def run_case(name, make):
        """Runs one bench case (``make()`` returns its result), prints it and adds it to the JSON."""
        start = time.time()
        try:
            res = make()
        except Exception as e:
            say(f"{name} failed: {type(e).__name__}: {e}")
            return
        res["device"], res["jax"], res["wall_s"] = meta["device"], meta["jax"], time.time() - start
        results["cases"][name] = res
        for line in bench.format_case(name, res):
            say(line)

    if os.environ.get("SKIP_B2") != "1":
        def b2():
            res = bench.case_b2(quick=False, repeats=5, sources=["hash"], population_size=B2_POP, calls=3)
            res["config"]["calls_per_timing"] = 3
            return res
        run_case("B2", b2)
    if os.environ.get("SKIP_B7") != "1":   # the hyperscale issue's GPU row: SmolLM2-135M, N >= 4096 on one card
        mb = os.environ.get("B7_MEMBER_BATCH")
        run_case("B7", lambda: bench.case_b7(quick=False, repeats=5, sources=["hash"],
                                             population_size=int(os.environ.get("B7_POP", "4096")),
                                             member_batch=int(mb) if mb else None))
    results["meta"]["wall_s"] = time.time() - t0
    with open(os.path.join(OUT, "gpu_bench.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    with open(os.path.join(OUT, "gpu_bench.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    say(f"\nwall {time.time() - t0:.1f}s; wrote {OUT}/gpu_bench.json and {OUT}/gpu_bench.txt")


if __name__ == "__main__":
    sys.exit(main())
