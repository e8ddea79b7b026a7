"""scripts/countdown_h2h.py (issue #24, item 2) end to end on the tiny random model at minimal budgets: calibrate,
tune (one trial per method), run (one seed per method), then the same commands again with ``--resume``, which must
train nothing. All in one process, so each function is compiled once; XLA's optimisations are turned off while it
runs (the tiny model's compile time dominates)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from esx_envs.llm import h2h, tasks
from esx_envs.llm import task as llm_task

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "countdown_h2h.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("countdown_h2h", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fast_compile():
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
    # the unoptimised executables stay in jit's caches and in the llm modules' cached functions, and a later test
    # in this process would run them (tests/test_golden.py's train_llm digest moved): drop them all
    jax.clear_caches()
    from esx_envs.llm import h2h, task
    for fn in (h2h, task):
        for obj in vars(fn).values():
            if hasattr(obj, "cache_clear"):
                obj.cache_clear()


def _countdown_problem(question: str):
    """The Countdown problem a recorded question states (its numbers and target: what the split hashes)."""
    m = re.match(r"Using the numbers \[([0-9, ]+)\], create an equation that equals ([0-9]+)\.", question)
    return tasks.Problem(question, int(m.group(2)), {"numbers": tuple(int(x) for x in m.group(1).split(","))})


COMMON = ["--model", "tiny", "--set", "system_prompt=none", "--set", "chat=false", "--set", "max_new_tokens=6",
          "--set", "val_size=6", "--set", "tune_size=6", "--quiet",
          "--eval-batch", "4"]   # = GRPO's batch (2 prompts x 2 samples): one compiled generator for both
GRPO_SMALL = ["--grpo-settings", "group_size=2,prompts_per_step=2"]
SPACE = ["--es-population", "4", "--es-prompts", "1", "--grpo-group", "2", "--grpo-prompts", "2", "--grpo-clip", "0.2"]


def test_head_to_head_smoke_and_resume(script, fast_compile, tmp_path):
    out = ["--out", str(tmp_path)]
    cal = script.main(["calibrate", *out, *COMMON, *GRPO_SMALL, "--minutes", "1e-6"])   # GRPO steps: the budget
    tune = script.main(["tune", *out, *COMMON, *SPACE, "--trials", "1", "--tune-budget", "0.5x"])
    run = script.main(["run", *out, *COMMON, "--seeds", "0", "--budget", "1x", "--eval-every", "0.5x"])
    assert cal["steps"] == 2 and tune["steps"] > 0 and run["steps"] > 0   # the first step is not counted
    data = json.loads((tmp_path / "h2h.json").read_text())
    budget = data["calibration"]["token_passes"]
    assert budget > 0 and data["run_budget"] == {"budget": budget, "eval_every": round(budget / 2)}

    # both methods, one seed each: token-passes from 0, non-decreasing; evaluations at the thresholds, and the end
    # at the step nearest the budget (h2h.Progress.reached with final=True)
    for section, splits in (("tune", ("tune",)), ("runs", ("val", "tune"))):
        for method in ("es", "grpo"):
            cells = data[section][method]
            assert list(cells) == ["0"] and cells["0"]["done"]
            recs, budget = cells["0"]["records"], cells["0"]["budget"]
            tp = [r["token_passes"] for r in recs]
            assert tp[0] == 0 and all(a <= b for a, b in zip(tp, tp[1:]))
            marks = h2h.thresholds(budget, cells["0"]["eval_every"])
            # every threshold before the budget is evaluated at the first step at or past it (one step can pass
            # several: one evaluation), and every evaluation between base and end is such a first step
            assert all(any(a < m <= b for a, b in zip(tp, tp[1:])) for m in marks[:-1])
            assert all(any(a < m <= b for m in marks[:-1]) for a, b in zip(tp, tp[1:-1]))
            if method == "es":   # the runner's records give the last step's token-passes exactly
                train = [json.loads(line) for line in
                         (tmp_path / "cells" / cells["0"]["key"] / "metrics.jsonl").read_text().splitlines()]
                train = [r for r in train if r["kind"] == "train"]
                last = train[-1]["gen_token_passes"]
                assert train[-1]["token_passes"] == tp[-1]
            else:                # at least one step since the previous evaluation
                last = tp[-1] - tp[-2]
            assert budget - tp[-1] < last / 2 if tp[-1] < budget else tp[-1] - last < budget
            assert cells["0"]["first_steps"] == [1] and recs[-1]["first_steps_s"] > 0
            assert len(recs) >= 2 and all(a <= b for a, b in zip([r["wall_s"] for r in recs],
                                                                  [r["wall_s"] for r in recs][1:]))
            for r in recs:
                for s in ("val", "tune"):
                    acc = r[f"{s}_accuracy"]
                    assert (0.0 <= acc <= 1.0) if s in splits else acc is None
    # the chosen settings are the (only) trials', and the runs used them
    for method in ("es", "grpo"):
        assert data["chosen"][method] == data["tune"][method]["0"]["settings"]
        assert data["runs"][method]["0"]["settings"] == data["chosen"][method]
    assert data["tune"]["es"]["0"]["settings"]["population_size"] == 4
    assert data["tune"]["grpo"]["0"]["settings"]["group_size"] == 2
    # one set of held-out problems for both methods, from the hash-disjoint splits
    for s in ("val", "tune"):
        qs = data["problems"][s]
        assert len(qs) == 6 and {llm_task.problem_split(_countdown_problem(q)) for q in qs} == {s}

    table = (tmp_path / "h2h.md").read_text().split("\n\n")[0]   # the head-to-head table (then the trials)
    rows = [line for line in table.splitlines() if line.startswith("| ES |") or line.startswith("| GRPO |")]
    assert len(rows) == 2 and all("| 1 (0) |" in row for row in rows)
    signal = (tmp_path / "h2h.md").read_text().split("| ES cell |")[1]   # the ES cells' signal table, last
    for cell in ("tune-es-0", "run-es-seed0"):
        train = [json.loads(line) for line in (tmp_path / "cells" / cell / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in train if r["kind"] == "train"]
        assert f"| {cell} | learning_rate=" in signal and f"| {len(train)} | {sum(r['no_signal'] for r in train)} (" \
            in signal
    png = tmp_path / "h2h.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # again with --resume: every cell is finished, nothing trains, no record changes
    again = [script.main([cmd, *out, *COMMON, *extra, "--resume"]) for cmd, extra in (
        ("calibrate", [*GRPO_SMALL, "--minutes", "1e-6"]), ("tune", [*SPACE, "--trials", "1", "--tune-budget", "0.5x"]),
        ("run", ["--seeds", "0", "--budget", "1x", "--eval-every", "0.5x"]))]
    assert [a["steps"] for a in again] == [0, 0, 0] and all(a["trained"] == [] for a in again)
    assert again[0]["skipped"] == ["calibration"]
    assert again[1]["skipped"] == ["tune-es-0", "tune-grpo-0"] and again[2]["skipped"] == ["run-es-seed0",
                                                                                          "run-grpo-seed0"]
    assert not list((tmp_path / "cells").glob("*/checkpoints")) and not list((tmp_path / "cells").glob("*/*.npz"))
    after = json.loads((tmp_path / "h2h.json").read_text())
    for key in ("calibration", "tune", "runs", "chosen", "base_eval"):
        assert after[key] == data[key]
    assert [i["steps"] for i in after["invocations"]][-3:] == [0, 0, 0]
    with pytest.raises(SystemExit, match="--resume"):   # without --resume it refuses to touch finished cells
        script.main(["run", *out, *COMMON, "--seeds", "0", "--budget", "1x", "--eval-every", "0.5x"])
    # another budget or trial setting is refused before anything is written: the JSON keeps its records
    with pytest.raises(SystemExit, match="was started with"):
        script.main(["run", *out, *COMMON, "--seeds", "0", "--budget", "0.5x", "--eval-every", "0.5x", "--resume"])
    with pytest.raises(SystemExit, match="was started with"):
        script.main(["tune", *out, *COMMON, *SPACE, "--trials", "1", "--tune-budget", "0.25x", "--resume"])
    refused = json.loads((tmp_path / "h2h.json").read_text())
    for key in ("run_budget", "tune_setup", "runs", "tune", "chosen"):
        assert refused[key] == after[key]

    # a method without tuned settings is not run with its defaults unless asked
    untuned = tmp_path / "untuned"
    untuned.mkdir()
    del refused["chosen"]["grpo"], refused["runs"]
    (untuned / "h2h.json").write_text(json.dumps(refused))
    with pytest.raises(SystemExit, match="no tuned grpo settings"):
        script.main(["run", "--out", str(untuned), *COMMON, "--seeds", "1", "--budget", "1x", "--resume"])
    assert "runs" not in json.loads((untuned / "h2h.json").read_text())


def test_grpo_cell_resumes_exactly(fast_compile, tmp_path):
    """A GRPO cell checkpointed after one step and continued in a new arm ends bit-identical to two steps in one."""
    from esx_envs.configs import get_config

    base = get_config("llm-countdown").replace(model="tiny", system_prompt="none", chat=False, max_new_tokens=6,
                                               val_size=6, tune_size=6)
    ctx = h2h.context(base, 0, 4)   # the first test's (same config): the model is loaded once
    settings = {"group_size": 2, "prompts_per_step": 2, "learning_rate": 1e-2, "clip_eps": 0.2}

    def arm(folder):   # the random model never solves Countdown: a reward that varies within a group instead
        out = h2h.GRPOArm(ctx, settings, 1, tmp_path / folder)
        out.trainer.reward_fn = lambda problem, text: float(len(set(text)))
        return out

    whole = arm("a")
    p = whole.restore(set())
    whole.train_until(1, p)
    whole.train_until(p.token_passes + 1, p)
    first = arm("b")
    q = first.restore(set())
    first.train_until(1, q)
    second = arm("b")
    r = second.restore(set())
    assert (r.generation, r.token_passes, r.last_step, r.wall_s) == (1, q.token_passes, q.last_step, q.wall_s)
    assert r.last_step > 0
    second.train_until(r.token_passes + 1, r)
    assert (r.generation, r.token_passes) == (p.generation, p.token_passes) == (2, p.token_passes)
    for a, b in zip(jax.tree_util.tree_leaves((whole.trainer.params, whole.trainer.opt_state)),
                    jax.tree_util.tree_leaves((second.trainer.params, second.trainer.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(whole.trainer.params), jax.tree_util.tree_leaves(ctx.params)))   # it trained


def test_selected_record_is_the_best_tuning_evaluation_not_the_best_validation():
    """The 'best checkpoint' column picks each seed's evaluation by tuning-split accuracy (earliest on ties) and
    reports its validation accuracy: never the validation maximum itself (that would select on the test set)."""
    def rec(tp, val, tune):
        return {"token_passes": tp, "val_accuracy": val, "tune_accuracy": tune, "wall_s": tp / 100}

    data = {"runs": {"es": {
        "1": {"done": True, "seed": 1, "settings": {"sigma": 1e-3}, "records": [
            rec(0, 0.30, 0.15), rec(10, 0.90, 0.40), rec(20, 0.50, 0.60), rec(30, 0.70, 0.60), rec(40, 0.40, 0.50)]},
        "2": {"done": True, "seed": 2, "settings": {"sigma": 1e-3}, "records": [
            rec(0, 0.30, 0.15), rec(40, 0.20, 0.10)]},
        "3": {"done": False, "seed": 3, "settings": {"sigma": 1e-3}, "records": [rec(0, 0.30, 0.15)]}}}}
    picked = h2h.selected_records(data)
    assert [r["val_accuracy"] for r in picked["es"]] == [0.50, 0.30] and picked["grpo"] == []
    assert [r["val_accuracy"] for r in h2h.final_records(data)["es"]] == [0.40, 0.20]
    row = next(line for line in h2h.markdown_table(data).splitlines() if line.startswith("| ES |"))
    assert "| 30.0% ± 10.0 | 40.0% ± 10.0 |" in row


def test_es_signal_counts_tied_generations_from_the_cells_metrics(tmp_path):
    """The report's ES signal table: generations, those with no signal, the mean tied-pair fraction and the median
    ESS, read from each ES cell's metrics.jsonl (eval records, GRPO cells and folders without records ignored;
    tuning trials first); an unfinished cell is marked."""
    def cell(name, train, config=None):
        d = tmp_path / name
        d.mkdir()
        lines = [{"kind": "eval", "generation": 0, "no_signal": True}] + [
            {"kind": "train", "generation": i + 1, **r} for i, r in enumerate(train)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
        if config:
            (d / "config.json").write_text(json.dumps(config))

    rec = lambda ns, flat, ess: {"no_signal": ns, "flat_group_fraction": flat, "ess": ess}
    cell("run-es-seed1", [rec(True, 1.0, 0.0), rec(False, 0.5, 4.0), rec(True, 1.0, 0.0), rec(False, 0.25, 6.0)],
         {"population_size": 16, "prompts_per_member": 2, "sigma": 8e-4, "learning_rate": 7e-4, "seed": 1})
    cell("tune-es-0", [rec(False, 0.0, 8.0)])
    cell("run-grpo-seed1", [rec(True, 1.0, 0.0)])
    (tmp_path / "run-es-seed2").mkdir()
    rows = h2h.es_signal(tmp_path)
    assert [r["cell"] for r in rows] == ["tune-es-0", "run-es-seed1"]
    r = rows[1]
    assert (r["generations"], r["no_signal"], r["flat_group_fraction"], r["ess"]) == (4, 2, 0.6875, 2.0)
    assert r["settings"] == {"population_size": 16, "prompts_per_member": 2, "sigma": 8e-4, "learning_rate": 7e-4}
    table = h2h.signal_table(rows, finished={"tune-es-0"})
    assert "| run-es-seed1 (running) | learning_rate=0.0007, population_size=16, prompts_per_member=2, " \
           "sigma=0.0008 | 4 | 2 (50%) | 69% | 2.00 |" in table
    assert "| tune-es-0 |  | 1 | 0 (0%) | 0% | 8.00 |" in table
    assert h2h.signal_table([]) == ""


def test_mean_curve_matches_the_seeds_evaluations_by_index():
    """Seeds cross each budget threshold a step apart; the mean curve pairs their k-th evaluations (the final one of
    each seed included), not whatever each seed held at the earliest seed's x."""
    rec = lambda tp, w, acc: {"token_passes": tp, "wall_s": w, "val_accuracy": acc}   # noqa: E731
    cells = [{"records": [rec(0, 0, 0.32), rec(110_148, 280, 0.45), rec(550_692, 1560, 0.72)]},
             {"records": [rec(0, 0, 0.32), rec(109_900, 300, 0.31), rec(547_684, 2860, 0.73)]},
             {"records": [rec(0, 0, 0.32), rec(111_000, 290, 0.44), rec(550_328, 2060, 0.71), rec(600_000, 2100, 0.9)]}]
    x, y = h2h.curves(cells, "token_passes")
    np.testing.assert_allclose(x, [0, (110_148 + 109_900 + 111_000) / 3, (550_692 + 547_684 + 550_328) / 3])
    np.testing.assert_allclose(y, [0.32, (0.45 + 0.31 + 0.44) / 3, 0.72])
    x, y = h2h.curves(cells, "wall_s")
    np.testing.assert_allclose(x, [0, 290, (1560 + 2860 + 2060) / 3])
    np.testing.assert_allclose(y[-1], 0.72)
