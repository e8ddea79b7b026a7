"""Trains the integer EGG model with integer EGGROLL on bytes (interim entry point until the shared driver runs it).

    python scripts/egg_train.py --run-dir runs/egg --minutes 10
    python scripts/egg_train.py --run-dir runs/egg --minutes 10 --resume     # continues exactly

Writes ``metrics.jsonl`` (one line per logged generation: bits/byte of the population on its training bytes,
validation bits/byte, α, fraction of changed weights, elapsed seconds), ``curve.png`` (if matplotlib is installed),
``checkpoint.npz`` (parameters, generation, noise key, carried hidden states, config) and prints progress.
The data windows are a pure function of the generation, so a resumed run is identical to an uninterrupted one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esx import int_eggroll as ie  # noqa: E402
from esx_envs import egg, text_data  # noqa: E402


@dataclasses.dataclass(frozen=True)
class EggRun:
    """Everything that defines a run (saved with each checkpoint)."""

    data: str = ""                 # file or folder; "" = shipped tinyshakespeare
    dim: int = 64
    layers: int = 1
    population_size: int = 256
    group_size: int = 2            # members sharing one data stream (antithetic partners at least)
    streams_per_member: int = 1
    length: int = 100              # bytes per member per generation
    sigma_shift: int = 4
    alpha: float = 0.1
    alpha_decay: float = 0.015
    seed: int = 0
    eval_every: int = 50
    eval_streams: int = 16
    eval_length: int = 1024        # validation subset while training (the final number uses all of it)
    checkpoint_every: int = 200


def save_checkpoint(path: Path, run: EggRun, state, hidden) -> None:
    leaves, _ = jax.tree_util.tree_flatten(state.params)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, *[np.asarray(x) for x in leaves], generation=np.asarray(state.generation),
             key=np.asarray(jax.random.key_data(state.key)), hidden=np.asarray(hidden),
             run=json.dumps(dataclasses.asdict(run)))
    os.replace(tmp, path)


def load_checkpoint(path: Path, run: EggRun, state, hidden):
    z = np.load(path)
    saved = json.loads(str(z["run"]))
    core = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("eval_every", "checkpoint_every")}
    if any(saved.get(k) != v for k, v in core.items()):
        raise ValueError(f"checkpoint {path} is from another config: {saved} vs {core}")
    leaves, treedef = jax.tree_util.tree_flatten(state.params)
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(z[f"arr_{i}"]) for i in range(len(leaves))])
    state = state.replace(params=params, generation=jnp.asarray(z["generation"]),
                          key=jax.random.wrap_key_data(jnp.asarray(z["key"])))
    return state, jnp.asarray(z["hidden"])


def train(run: EggRun, run_dir: Path, *, minutes: float | None = None, generations: int | None = None,
          resume: bool = False, quiet: bool = False) -> list[dict]:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = egg.EggConfig(dim=run.dim, layers=run.layers)
    split = text_data.load_split(run.data or None)
    params = egg.init_params(jax.random.key(run.seed), config)
    strat = ie.int_eggroll(population_size=run.population_size, sigma_shift=run.sigma_shift, alpha=run.alpha,
                           alpha_decay=run.alpha_decay, group_size=run.group_size, labels=egg.labels(params))
    state = strat.init(jax.random.key(run.seed + 1), params)
    groups = run.population_size // run.group_size
    b = run.streams_per_member
    streams = text_data.Streams(split.train, split.train_starts, num_streams=groups * b, length=run.length,
                                seed=run.seed)
    hidden = egg.initial_hidden(run.population_size, b, config)
    ckpt, log_path = run_dir / "checkpoint.npz", run_dir / "metrics.jsonl"
    if resume and ckpt.exists():
        state, hidden = load_checkpoint(ckpt, run, state, hidden)
    elif log_path.exists():
        log_path.unlink()
    step = egg.make_generation(strat, config)
    history = []
    t0, g = time.perf_counter(), int(state.generation)
    start_g = g
    offset = 0.0
    if resume and log_path.exists():
        lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
        lines = [x for x in lines if x["generation"] <= g]
        offset = lines[-1]["seconds"] if lines else 0.0
        log_path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        history = lines
    val = lambda p: egg.bits_per_byte(p, split.valid, config=config, streams=run.eval_streams,  # noqa: E731
                                      length=run.eval_length)
    if g == 0:
        rec = {"generation": 0, "seconds": 0.0, "valid_bpb": val(state.params)}
        history.append(rec)
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    tokens_per_gen = run.population_size * b * run.length
    while True:
        elapsed = time.perf_counter() - t0
        if minutes is not None and elapsed >= minutes * 60:
            break
        if generations is not None and g >= generations:
            break
        tok, res = streams.batch(g)
        state, hidden, m = step(state, hidden, jnp.asarray(tok.reshape(groups, b, -1)),
                                jnp.asarray(res.reshape(groups, b, -1)))
        g += 1
        if g % run.eval_every == 0 or g % run.checkpoint_every == 0:
            train_bpb = -float(m.fitness_mean) / 4096 / (b * run.length)
            rec = {"generation": g, "seconds": round(offset + time.perf_counter() - t0, 2), "train_bpb": train_bpb,
                   "alpha": float(m.alpha), "changed_fraction": float(m.changed_fraction)}
            if g % run.eval_every == 0:
                rec["valid_bpb"] = val(state.params)
            history.append(rec)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if not quiet:
                rate = (g - start_g) * tokens_per_gen / max(time.perf_counter() - t0, 1e-9)
                print(f"gen {g:6d}  {rec['seconds']:8.1f}s  train {train_bpb:.3f}  valid "
                      f"{rec.get('valid_bpb', float('nan')):.3f}  α {rec['alpha']:.4f}  changed "
                      f"{rec['changed_fraction']:.4f}  {rate:,.0f} member-bytes/s", flush=True)
        if g % run.checkpoint_every == 0:
            save_checkpoint(ckpt, run, state, hidden)
    save_checkpoint(ckpt, run, state, hidden)
    final = {"generation": g, "seconds": round(offset + time.perf_counter() - t0, 2),
             "final_valid_bpb_full": egg.bits_per_byte(state.params, split.valid, config=config, streams=64)}
    history.append(final)
    with log_path.open("a") as f:
        f.write(json.dumps(final) + "\n")
    if not quiet:
        print(f"final validation bits/byte (all {len(split.valid)} bytes, 64 streams): "
              f"{final['final_valid_bpb_full']:.3f}")
        print("sample:", repr(egg.sample(state.params, "ROMEO:", 200, jax.random.key(0), config=config,
                                          temperature=0.8)))
    _plot(history, run_dir / "curve.png")
    return history


def _plot(history, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    pts = [(h["seconds"] / 60, h["valid_bpb"]) for h in history if "valid_bpb" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*pts), label="EGG int8 (validation subset)")
    ax.axhline(4.83, ls="--", c="gray", label="unigram 4.83")
    ax.axhline(3.59, ls=":", c="gray", label="bigram 3.59")
    ax.set_xlabel("minutes")
    ax.set_ylabel("bits/byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/egg")
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--generations", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    for f in dataclasses.fields(EggRun):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args(argv)
    run = EggRun(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EggRun)})
    if args.minutes is None and args.generations is None:
        args.minutes = 10.0
    train(run, Path(args.run_dir), minutes=args.minutes, generations=args.generations, resume=args.resume)


if __name__ == "__main__":
    main()
