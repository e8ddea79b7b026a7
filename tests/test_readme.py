"""The README's quickstart runs as written and its set-up commands match CI."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_runs(capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README-quickstart", "exec"), namespace)
    ns = namespace
    assert float(ns["fitness"](ns["state"].params, None, ns["x"])) > -1e-3   # started at -8
    assert -0.5 < float(ns["metrics"].fitness_mean) < -0.05                  # σ-limited, as the README says


def test_readme_custom_task_runs(tmp_path, monkeypatch):
    """The README's runner section, run after its quickstart, in a fresh directory: it trains, writes the run
    directory, and the resumed longer run continues to generation 200."""
    text = (ROOT / "README.md").read_text()
    quick = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    block = re.search(r"## Your own task through the runner\n.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(quick, "README-quickstart", "exec"), ns)
    exec(compile(block, "README-runner", "exec"), ns)
    assert ns["result"].state.generation == 200 and ns["result"].final_score > -1e-3
    records = [r for r in ns["esx"].run.read_metrics(tmp_path / "runs" / "quickstart") if r["kind"] == "train"]
    assert [r["generation"] for r in records] == list(range(1, 201))
    assert (tmp_path / "runs" / "quickstart" / "learning_curve.png").exists()


def test_ci_runs_the_readme_test_command():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", text, re.S).group(1)
    test_cmd = block.strip().splitlines()[1].split("#")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == test_cmd
