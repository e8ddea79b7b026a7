"""Run by tests/test_driver.py in a subprocess with 4 fake CPU devices: the driver sharded and unsharded."""
import json
import sys

import numpy as np

from esx import run
from esx_envs.rl import RLConfig

TINY = RLConfig(name="tiny", env="CartPole-v1", seed=3, generations=6, population_size=16, rank=2, sigma=0.2,
                   width=8, depth=1, layer_norm=False, max_steps=40, obs_norm=True, chunk=2, eval_every=3,
                   eval_episodes=4, final_eval_episodes=4, checkpoint_every=2)


def interrupt_at(generation):
    def callback(record):
        if record["generation"] >= generation:
            raise KeyboardInterrupt
    return callback


def main(tmp: str) -> None:
    import dataclasses

    quiet = dict(progress=False, log=lambda s: None)
    one = run.train(TINY, f"{tmp}/one", **quiet)
    four = run.train(dataclasses.replace(TINY, devices=4), f"{tmp}/four", **quiet)
    # Saved on 4 devices at generation 2, resumed on 1; saved on 1 at 4, resumed on all (4).
    run.train(dataclasses.replace(TINY, devices=4), f"{tmp}/mixed", callback=interrupt_at(2), **quiet)
    run.train(TINY, f"{tmp}/mixed", resume=True, callback=interrupt_at(4), **quiet)
    mixed = run.train(dataclasses.replace(TINY, devices=0), f"{tmp}/mixed", resume=True, **quiet)
    reduce = run.train(dataclasses.replace(TINY, devices=4, placement="reduce"), f"{tmp}/reduce", **quiet)
    ref = run.checkpoint._to_host(one.state)
    same = lambda r: all(np.array_equal(a, b) for a, b in zip(ref, run.checkpoint._to_host(r.state)))
    relf = lambda r: max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30))
                         for a, b in zip(ref, run.checkpoint._to_host(r.state)) if np.issubdtype(a.dtype, np.floating))
    rel = relf(reduce)
    # the leaves that are not floating point (generation, keys, counters) must be equal, not merely close
    ints = lambda r: all(np.array_equal(a, b) for a, b in zip(ref, run.checkpoint._to_host(r.state))
                         if not np.issubdtype(a.dtype, np.floating))
    num_ints = sum(not np.issubdtype(a.dtype, np.floating) for a in ref)
    try:
        run.make_setup(dataclasses.replace(TINY, devices=3))
        indivisible = "no error"
    except ValueError as e:
        indivisible = str(e)
    print(json.dumps({"indivisible": indivisible, "four_equals_one": same(four), "mixed_equals_one": same(mixed),
                      "four_rel": relf(four), "mixed_rel": relf(mixed), "num_int_leaves": num_ints,
                      "ints_equal": {"four": ints(four), "mixed": ints(mixed), "reduce": ints(reduce)},
                      "generation": int(mixed.state.es.generation), "reduce_rel": rel,
                      "moved": not np.array_equal(ref[0], run.checkpoint._to_host(run.make_setup(TINY).initial_state())[0])}))


if __name__ == "__main__":
    main(sys.argv[1])
