"""scripts/interop_bench.py (issue #21) runs end to end at tiny sizes: the table lists every path it ran and every
path passed the numerical check against the hand-written esx model. Nothing here asserts on timing.

The test runs one framework on the MLP (3 paths; about 10 s on the shared 2-core machine, most of it XLA compiling
the three generation steps). The whole benchmark (both cases, three frameworks, 18 paths) takes minutes of
compiling and is not run by the tests; that every framework's population fitness equals the hand-written model is
tests/test_interop.py's check.
"""
from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("equinox")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "interop_bench.py"


def _script():
    name = "interop_bench_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module       # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


def _run(tmp_path, *args):
    bench = _script()
    out, path = io.StringIO(), tmp_path / "bench.json"
    rc = bench.main(["--tiny", "--repeats", "1", "--generations", "1", "--json", str(path), *args], out=out)
    return bench, rc, out.getvalue(), json.loads(path.read_text())


def _assert_complete(bench, rc, text, data, cases, frameworks):
    assert rc == 0, text
    assert "numerical check: passed" in text, text
    assert data["checks_ok"] is True
    expected = {(c, f"{fw}/{kind}") for c in cases for fw in frameworks for kind in bench.KINDS}
    table = text[text.index("case "):]
    rows = {(m.group(1), m.group(2)) for m in re.finditer(r"^(\w+)\s+\| (\S+)\s+\| \d", table, re.M)}
    assert rows == expected, table                       # every path timed and printed, none failed the check
    for c in cases:
        for fw in frameworks:
            assert "interop benchmark" in text and "load average" in text and "os.cpu_count()" in text
            for kind in ("interop", "materialised"):
                assert re.search(rf"check {c}\s+{fw}/{kind}\s+ok\s+max \|f - f_esx\| = ", text), text
    got = {(r["case"], r["framework"], r["path"]) for r in data["results"]}
    assert got == {(c, fw, kind) for c in cases for fw in frameworks for kind in bench.KINDS}
    for r in data["results"]:
        assert r["check_ok"] and r["ms_per_generation"]["values"]
        if r["path"] == "interop":
            assert r["throughput_vs_esx"] is not None and r["throughput_vs_materialised"] is not None
            assert r["same_matmuls_as_esx"] is not None


def test_interop_bench_smoke(tmp_path):
    bench, rc, text, data = _run(tmp_path, "--cases", "mlp", "--frameworks", "linen")
    _assert_complete(bench, rc, text, data, ["mlp"], ["linen"])
    assert data["meta"]["tiny"] is True and data["meta"]["versions"]["jax"]
