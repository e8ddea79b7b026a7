"""Executes the notebooks at small settings (their parameters come from environment variables), and checks that
each one starts with a cell that installs esx without editing (Colab: `esx-jax[extras]` from PyPI; inside the
repository: the checkout)."""
import ast
import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_notebook(name: str, env: dict[str, str], timeout: int = 600):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    env = {"ESX_SKIP_INSTALL": "1", **env}       # the first cell (install) then uses the esx under test
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(ROOT / "notebooks")}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def outputs_text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_quickstart_notebook_fits():
    nb = run_notebook("quickstart.ipynb", {"ESX_NB_GENERATIONS": "300"})
    text = outputs_text(nb)
    line = next(t for t in text.splitlines() if t.startswith("generations:"))
    mse, start = float(line.split("final MSE:")[1].split()[0]), float(line.split("start:")[1].strip(" )"))
    assert "generations: 300" in line
    assert mse < 0.2 * start, line
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))
    runner = next(t for t in text.splitlines() if t.startswith("runner:"))
    first, last = (float(v) for v in runner.split("MSE")[1].split("->"))
    assert "generation 300" in runner and last < first < start, runner


@pytest.mark.slow
def test_bring_your_own_model_notebook_trains_nnx_and_equinox():
    """An unchanged Flax NNX policy learns CartPole and an unchanged eqx.nn.MLP fits sin(2x), at the notebook's own
    settings (about 30 s on 2 CPU cores)."""
    nb = run_notebook("bring_your_own_model.ipynb", {})
    text = outputs_text(nb)
    assert "MaterializeWarning" not in text, text          # every matrix of both models ran low-rank
    cartpole = next(t for t in text.splitlines() if t.startswith("cartpole:"))
    first, last = (float(v) for v in cartpole.split("return")[1].split("in")[0].split("->"))
    greedy = float(cartpole.split("20 episodes:")[1])
    assert "in 50 generations" in cartpole and last > max(150.0, 2 * first) and greedy > 150.0, cartpole
    equinox = next(t for t in text.splitlines() if t.startswith("equinox:"))
    start, end = (float(v) for v in equinox.split("MSE")[1].split("in")[0].split("->"))
    assert "in 200 generations" in equinox and end < 0.05 * start, equinox
    assert "an eqx.nn.MLP: True" in text
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))


# ---------------------------------------------------------------------------------------------------------------
# install cells

NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
EXTRAS = {"quickstart.ipynb": "driver", "rl_cartpole.ipynb": "rl", "egg_int8.ipynb": "driver",
          "llm_reasoning.ipynb": "llm", "bring_your_own_model.ipynb": "rl,interop"}


def install_cell(name: str) -> tuple[str, str]:
    """The source of the notebook's first cell and the extras it installs (its EXTRAS = "..." line)."""
    cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
    assert cells[0]["cell_type"] == "code", f"{name}: the first cell must install esx"
    source = "".join(cells[0]["source"])
    extras = next(node.value.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
                  and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["EXTRAS"])
    return source, extras


def run_install_cell(source: str, monkeypatch, skip: bool) -> tuple[dict, list]:
    """Executes the cell with pip and site.addsitedir recorded instead of run; returns its namespace and the
    commands it would have run."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr("site.addsitedir", lambda *a, **kw: None)
    if skip:
        monkeypatch.setenv("ESX_SKIP_INSTALL", "1")
    else:
        monkeypatch.delenv("ESX_SKIP_INSTALL", raising=False)
    ns: dict = {}
    exec(compile(source, "install-cell", "exec"), ns)
    return ns, calls


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_first_cell_installs_without_editing(name):
    source, extras = install_cell(name)
    known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras == EXTRAS.get(name, extras) and set(extras.split(",")) <= set(known), extras
    assert 'f"esx-jax[{EXTRAS}]"' in source and 'f"{root}[{EXTRAS}]"' in source
    assert "<" not in source, "a placeholder to fill in"
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == "subprocess.run"]
    assert calls, "the pip call is code, not a comment"
    every = "".join("".join(c["source"]) for c in json.loads((ROOT / "notebooks" / name).read_text())["cells"])
    assert "git+<" not in every and "# %pip" not in every and "# !pip" not in every


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_commands(name, monkeypatch, tmp_path):
    """ESX_SKIP_INSTALL=1 with esx importable: nothing runs (the notebook tests). Otherwise, from notebooks/ the
    checkout is installed editable with the notebook's extras, and from any other folder (Colab) esx-jax from PyPI."""
    source, extras = install_cell(name)
    monkeypatch.chdir(ROOT / "notebooks")
    ns, calls = run_install_cell(source, monkeypatch, skip=True)
    assert calls == []
    assert ns["esx_checkout"]() == ROOT and ns["esx_checkout"](ROOT / "notebooks") == ROOT
    _, calls = run_install_cell(source, monkeypatch, skip=False)
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[{extras}]"]]
    monkeypatch.chdir(tmp_path)
    ns, calls = run_install_cell(source, monkeypatch, skip=False)
    assert ns["esx_checkout"]() is None
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", f"esx-jax[{extras}]"]]
