"""scripts/rl_table.py: one tiny cell end to end (JSON, markdown, figure, resume) and the PPO normalisation."""
import importlib.util
import json
import math
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "rl_table.py")


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("rl_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rl_table"] = module
    spec.loader.exec_module(module)
    return module


def test_normalisation_by_ppo(table, tmp_path):
    cells = {}
    us = {"eggroll": [2.0, 4.0], "open_es": [6.0, 6.0], "ppo": [None, None]}
    for method, returns in {"eggroll": [300.0, 500.0], "open_es": [100.0, 100.0], "ppo": [200.0, 200.0]}.items():
        for seed, r in enumerate(returns):
            cells[f"cp|{method}|{seed}"] = {"config": "cp", "method": method, "seed": seed, "final_return": r,
                                            "us_per_env_step": us[method][seed]}
    cells["pend|eggroll|0"] = {"config": "pend", "method": "eggroll", "seed": 0, "final_return": -150.0,
                               "us_per_env_step": 5.0}
    cells["pend|ppo|0"] = {"config": "pend", "method": "ppo", "seed": 0, "final_return": -300.0}
    s = table.summarise(cells, ["cp", "pend"], ["eggroll", "open_es", "ppo"])
    assert s["cp"]["eggroll"]["mean"] == 400.0 and s["cp"]["eggroll"]["se"] == pytest.approx(100.0)
    assert s["cp"]["eggroll"]["norm_mean"] == pytest.approx(2.0) and s["cp"]["eggroll"]["norm_se"] == 0.5
    assert s["cp"]["open_es"]["norm_mean"] == pytest.approx(0.5) and s["cp"]["ppo"]["norm_mean"] == 1.0
    assert [s["cp"][m]["us_per_env_step"] for m in ("eggroll", "open_es", "ppo")] == [3.0, 6.0, None]
    import argparse

    md = table.write_markdown(str(tmp_path / "t.md"), s, ["eggroll", "open_es", "ppo"],
                              argparse.Namespace(minutes=2.0, env_steps=None, seeds=2))
    assert "| 3.0 | 6.0 | 2.00× |" in md        # µs per step of each ES method and OpenES / EGGROLL
    assert md.splitlines()[-1].endswith("| 5.0 | – | – |")   # pend: EGGROLL's timing without OpenES's
    assert s["pend"]["eggroll"]["norm_mean"] == pytest.approx(1.5)      # half PPO's loss: better than PPO
    assert "open_es" not in s["pend"]
    # a cell of a seed beyond the table's seeds (e.g. from a longer earlier invocation) is not averaged in
    cells["cp|eggroll|2"] = {"config": "cp", "method": "eggroll", "seed": 2, "final_return": 0.0}
    assert table.summarise(cells, ["cp"], ["eggroll"], seeds=2)["cp"]["eggroll"]["mean"] == 400.0
    assert table.summarise(cells, ["cp"], ["eggroll"])["cp"]["eggroll"]["n"] == 3


def test_one_tiny_cell_writes_json_markdown_figure_and_resumes(table, tmp_path):
    argv = ["--configs", "cartpole", "--methods", "eggroll", "--env-steps", "300", "--seeds", "1", "--out",
            str(tmp_path), "--population", "4", "--width", "4", "--depth", "0", "--max-steps", "20",
            "--eval-episodes", "2"]
    summary = table.main(argv)
    cells = json.loads((tmp_path / "cells.json").read_text())["cells"]
    assert len(cells) == 1 and cells[0]["method"] == "eggroll" and cells[0]["env_steps"] >= 300
    assert 1 <= cells[0]["final_return"] <= 20                  # CartPole episodes capped at 20 steps
    assert summary["cartpole"]["eggroll"]["mean"] == cells[0]["final_return"]
    assert "| cartpole |" in (tmp_path / "table.md").read_text() and (tmp_path / "table.png").stat().st_size > 0
    table.main(argv + ["--resume"])                             # the finished cell is kept, not run again
    assert json.loads((tmp_path / "cells.json").read_text())["cells"] == cells
    (tmp_path / "table.md").unlink()
    report = table.main(argv[:-2] + ["--seeds", "3", "--report"] + argv[-2:])   # trains nothing, writes the table
    assert json.loads((tmp_path / "cells.json").read_text())["cells"] == cells and report == summary
    assert f"{cells[0]['final_return']:.1f} ± 0.0 (n=1)" in (tmp_path / "table.md").read_text()


def test_methods_take_turns_within_a_seed_and_ppo_shares_the_es_episode_limit(table, tmp_path):
    """Cells run seed by seed with the methods in turn (load falls on each alike; every cell records the load).
    With a budget in minutes each ES cell trains past its compiling first generation and PPO takes the environment
    steps the EGGROLL cell of its seed took, on the config's adapter with the same ``max_steps`` (AdapterEnv). A
    resume at another budget is refused."""
    pytest.importorskip("rejax")
    argv = ["--configs", "cartpole", "--out", str(tmp_path), "--population", "4", "--width", "4", "--depth", "0",
            "--max-steps", "20", "--eval-episodes", "2", "--ppo-envs", "4", "--ppo-steps", "32"]
    table.main(argv + ["--minutes", "0.002", "--methods", "eggroll,open_es,ppo", "--seeds", "1"])
    # PPO listed first still runs after EGGROLL (its step budget); capped below EGGROLL's steps it says so
    summary = table.main(argv + ["--minutes", "0.002", "--methods", "ppo,eggroll,open_es", "--seeds", "2",
                                 "--resume", "--ppo-max-env-steps", "256"])
    data = json.loads((tmp_path / "cells.json").read_text())
    cells = data["cells"]
    assert data["budget_minutes"] == 0.002 and data["budget_env_steps"] is None
    assert [(c["method"], c["seed"]) for c in cells] == [("eggroll", 0), ("open_es", 0), ("ppo", 0),
                                                          ("eggroll", 1), ("open_es", 1), ("ppo", 1)]
    assert all(len(c["load_1min"]) == 2 for c in cells)
    assert all(c["generations"] >= 2 and c["timed_s"] >= 0.12 for c in cells if c["method"] != "ppo")
    ppo = cells[2]
    assert ppo["env_steps"] == cells[0]["env_steps"] and ppo["env"] == "CartPole-v1" and ppo["max_steps"] == 20
    assert 1 <= ppo["final_return"] <= 20 and "capped_from_env_steps" not in ppo
    assert cells[3]["env_steps"] > 256
    assert cells[5]["env_steps"] == 256 and cells[5]["capped_from_env_steps"] == cells[3]["env_steps"]
    assert summary["cartpole"]["ppo"]["capped"]
    assert "capped by --ppo-max-env-steps" in (tmp_path / "table.md").read_text()
    with pytest.raises(SystemExit, match="use the same budget"):
        table.main(argv + ["--env-steps", "256", "--seeds", "2", "--resume"])


def test_rl_grad_snr_script_estimates_have_the_same_scale_for_both_strategies():
    """scripts/rl_grad_snr.py: at the initial policy EGGROLL's and OpenES's gradient estimates have the same
    expected norm (the same per-entry noise variance, the same shaping); a missing 1/√r or σ factor would put the
    ratio of the total norms far outside [0.7, 1.4]. --estimates 1 is refused."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "rl_grad_snr.py"
    spec = importlib.util.spec_from_file_location("rl_grad_snr", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--estimates", "1"])
    out = module.main(["--config", "cartpole", "--estimates", "2", "--set", "population_size=128", "width=8",
                       "depth=1", "max_steps=100"])
    leaves = out["leaves"]
    assert set(leaves) >= {"['hidden'][0]['w']", "['out']['w']"}
    total = {s: math.sqrt(sum(row[s]["norm"] ** 2 for row in leaves.values())) for s in ("eggroll", "open_es")}
    assert 0.7 < total["eggroll"] / total["open_es"] < 1.4, total


def test_two_table_processes_sharing_out_keep_each_others_cells(table, tmp_path):
    """Two invocations that read cells.json before either wrote (e.g. PPO cells in one process, ES cells in another):
    each save merges with the file, so no cell is lost and the later writer's own cells win only for its own keys."""
    import argparse

    args = argparse.Namespace(minutes=2.0, env_steps=None)
    path = str(tmp_path / "cells.json")
    cell = lambda c, m, r: {"config": c, "method": m, "seed": 0, "final_return": r}  # noqa: E731
    table.save_cells(path, {"a|eggroll|0": cell("a", "eggroll", 1.0)}, args)
    first, second = table.load_cells(path, args), table.load_cells(path, args)   # both read the same state
    first["a|ppo|0"] = cell("a", "ppo", 2.0)
    table.save_cells(path, first, args)
    second["b|eggroll|0"] = cell("b", "eggroll", 3.0)
    table.save_cells(path, second, args)
    on_disk = table.load_cells(path, args)
    assert set(on_disk) == {"a|eggroll|0", "a|ppo|0", "b|eggroll|0"} and on_disk["a|ppo|0"]["final_return"] == 2.0
    assert "a|ppo|0" in second            # the second process now sees the first one's cell (PPO's step budget)
    with pytest.raises(SystemExit, match="budget"):  # a file of another budget is never merged into
        table.save_cells(path, {}, argparse.Namespace(minutes=None, env_steps=1000))
