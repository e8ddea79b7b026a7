"""Run records: ``metrics.jsonl`` (one JSON record per generation and evaluation), ``metrics.csv``, optional
TensorBoard event files, and the learning curve ``learning_curve.png``.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

from esx.run.task import Setup

def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` (``kind``: ``"train"`` per generation, ``"eval"`` for each periodic
    evaluation, ``"final"`` for the larger end-of-run evaluation, also in ``summary.json``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill: everything before it is valid
    return out


def truncate_logs(run_dir: Path, generation: int) -> None:
    """Drops records beyond ``generation`` (written after the checkpoint a resume starts from), and the previous
    segment's ``"final"`` evaluation (the run goes on, so it was not the end)."""
    records = [r for r in read_metrics(run_dir) if r["generation"] <= generation and r["kind"] != "final"]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    write_csv(run_dir, records)


def write_csv(run_dir: Path, records: list[dict]) -> None:
    """One row per generation: the train record's numbers, then the evaluation's numbers where there was one."""
    train = [r for r in records if r["kind"] == "train"]
    evals = {r["generation"]: r for r in records if r["kind"] == "eval"}
    skip = {"kind", "generation", "wall_time"}
    fields = ["generation"]
    for r in train[:1] + list(evals.values())[:1]:
        fields += [k for k, v in r.items() if k not in skip and k not in fields and isinstance(v, (int, float))]
    fields.append("wall_time")
    with open(run_dir / "metrics.csv", "w") as f:
        f.write(",".join(fields) + "\n")
        for r in train:
            row = {**evals.get(r["generation"], {}), **r}
            f.write(",".join(str(row.get(k, "")) for k in fields) + "\n")


def plot_learning_curve(run_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                        title: str | None = None, setup: Setup | None = None, *, x: str = "generation") -> Path:
    """Saves the learning curve as PNG: per-generation fitness (``setup.plot_keys``) and the evaluations of the
    unperturbed parameters, with ``setup.references`` and the target (``setup.target``) as dashed lines.

    Args:
      run_dir: the run directory (its ``metrics.jsonl`` is read).
      path: the PNG's path (default ``run_dir/learning_curve.png``).
      title: the plot's title (default: the directory name).
      setup: the run's :class:`Setup` (keys, labels, references, target); ``None``: an RL run's defaults.
      x: the horizontal axis: ``"generation"`` or ``"wall_time"`` (seconds since the start of the run).

    Returns:
      the path written.
    """
    if x not in ("generation", "wall_time"):
        raise ValueError(f"x={x!r}; valid axes are ['generation', 'wall_time']")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    keys = setup.plot_keys if setup is not None else ("return_mean", "return_max")
    score = setup.score if setup is not None else "eval_return_mean"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    if train:
        g = [r.get(x, math.nan) for r in train]
        for j, k in enumerate(keys):
            if k in train[0]:
                ax.plot(g, [r[k] for r in train], lw=1 if j == 0 else 0.8, alpha=1 if j == 0 else 0.6,
                        label=f"population {k.replace('_', ' ')}")
    if evals:
        ax.plot([r.get(x, math.nan) for r in evals], [r.get(score, math.nan) for r in evals], "o-", ms=3,
                label=f"unperturbed: {score.replace('_', ' ')}")
    lines = list(setup.references) if setup is not None else []
    if setup is not None and setup.target is not None:
        lines.append((f"target {setup.target:g}", setup.target))
    for label, value in lines:
        ax.axhline(value, ls="--", lw=0.8, c="gray")
        ax.annotate(label, (0, value), textcoords="offset points", xytext=(2, 2), fontsize=7, color="gray",
                    xycoords=("axes fraction", "data"))
    ax.set_xlabel("generation" if x == "generation" else "wall-clock time (s)")
    ax.set_ylabel(setup.ylabel if setup is not None else "episode return")
    ax.set_title(textwrap.fill(title or str(run_dir.name), 72), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(path) if path is not None else run_dir / "learning_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out


_NOT_SCALARS = frozenset({"kind", "generation", "wall_time"})


class TensorBoard:
    """Optional TensorBoard output: every numeric field of a metrics record (but ``wall_time``: each event carries
    its own time) as the scalar ``<kind>/<field>`` at step ``generation``, in ``run_dir/tensorboard/`` (needs
    ``tensorboardX``: the ``tensorboard`` extra).

    A resumed run opens a new event file whose ``purge_step`` is the first generation it writes, so TensorBoard
    drops what the previous segment logged after the checkpoint (the same records :func:`truncate_logs` drops).
    """

    @staticmethod
    def writer_class():
        """``tensorboardX.SummaryWriter``, or an ImportError that names the extra (checked before a run starts)."""
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("tensorboard=True (--tensorboard) needs tensorboardX: pip install 'esx-jax[tensorboard]'"
                              ) from e
        return SummaryWriter

    def __init__(self, run_dir: Path, first_generation: int):
        self.writer = self.writer_class()(logdir=str(run_dir / "tensorboard"),
                                          purge_step=first_generation if first_generation > 1 else None,
                                          filename_suffix=f".gen{first_generation:08d}", flush_secs=10)

    def write(self, record: dict) -> None:
        step = int(record["generation"])
        for k, v in record.items():
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{record['kind']}/{k}", float(v), step)

    def close(self) -> None:
        self.writer.close()


def jsonable(d: dict) -> dict:
    """The entries of ``d`` that JSON can hold as they are (numbers, strings, bools, lists, ``None``)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list)) or v is None}


__all__ = ["TensorBoard", "jsonable", "plot_learning_curve", "read_metrics", "truncate_logs", "write_csv"]
