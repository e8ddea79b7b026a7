"""Executes the notebooks at small settings (their parameters come from environment variables)."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_notebook(name: str, env: dict[str, str], timeout: int = 600):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
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
