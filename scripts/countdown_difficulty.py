"""Base-model difficulty of Countdown generator settings: greedy accuracy on the held-out sets and how many distinct
puzzles each set holds (issue #24: the head-to-head needs a base accuracy of 5-40% on a set of distinct puzzles).

    python scripts/countdown_difficulty.py --grid "2,1,30,1,100" "3,1,6,1,60" [--val-size 128 --tune-size 64]

Each grid entry is ``numbers,min_number,max_number,min_target,max_target``; the rest of the problem is
``llm-countdown``'s (model, prompt, lenient scoring, 32 new tokens, puzzle-hashed splits). Prints one line per entry:
accuracy on the validation and tuning problems, their distinct puzzles, and the distinct puzzles found in
20 000 draws of the whole space (an estimate of its size). ``--json PATH`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

from esx_envs.configs import get_config
from esx_envs.llm import h2h
from esx_envs.llm import task as task_lib


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", nargs="+", required=True, help="numbers,min_number,max_number,min_target,max_target")
    p.add_argument("--val-size", type=int, default=128)
    p.add_argument("--tune-size", type=int, default=64)
    p.add_argument("--model", default=None, help="default: llm-countdown's model")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    base = get_config("llm-countdown")
    if args.model:
        base = base.replace(model=args.model)
    rows = []
    for entry in args.grid:
        n, lo, hi, tlo, thi = (int(x) for x in entry.split(","))
        cfg = base.replace(numbers=n, min_number=lo, max_number=hi, min_target=tlo, max_target=thi,
                           val_size=args.val_size, tune_size=args.tune_size)
        t0 = time.perf_counter()
        ctx = h2h.Context(cfg)
        space = {task_lib.puzzle_key(q) for q in ctx.task.sample(random.Random(123), 20_000)}
        row = {"numbers": n, "min_number": lo, "max_number": hi, "min_target": tlo, "max_target": thi,
               "space_distinct_in_20000_draws": len(space)}
        for split in ("val", "tune"):
            row[f"{split}_accuracy"] = ctx.evaluate(ctx.params, split)
            row[f"{split}_problems"] = len(ctx.problems[split])
            row[f"{split}_distinct"] = len({task_lib.puzzle_key(q) for q in ctx.problems[split]})
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
