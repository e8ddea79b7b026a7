"""The benchmark suite runs end to end at tiny sizes and records every case (no wall-clock assertions)."""
import json
import math

import pytest

from esx_envs import bench


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    rc = bench.main(["--quick", "--sources", "hash", "--repeats", "1", "--json", str(path)])
    assert rc == 0
    return json.loads(path.read_text())


def test_every_case_has_finite_positive_ratios_and_config(quick_results):
    meta, cases = quick_results["meta"], quick_results["cases"]
    assert meta["quick"] is True and meta["jax"] and meta["device"]
    assert set(cases) == set(bench.CASES)
    for name, res in cases.items():
        assert res["config"], name
        assert res["device"] and res["jax"], name
        assert res["ratios"], name
        for key, value in res["ratios"].items():
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, key, value)
        assert set(res["met"]) <= set(res["ratios"]), name


def test_b1_reports_both_noise_modes(quick_results):
    for name in ("B1a", "B1b"):
        ratios = quick_results["cases"][name]["ratios"]
        assert {"hash/on_the_fly", "hash/pregenerated"} <= set(ratios)


def test_b2_compares_with_full_rank(quick_results):
    ratios = quick_results["cases"]["B2"]["ratios"]
    assert any(k.startswith("open_es/") for k in ratios)


def test_unknown_case_is_an_error():
    with pytest.raises(ValueError, match="valid cases"):
        bench.run(cases=["B9"], quick=True, printer=None)
    with pytest.raises(ValueError, match="valid sources"):
        bench.run(cases=["B1a"], quick=True, sources=["gaussian"], printer=None)


def test_import_esx_does_not_import_evosax_or_psutil():
    import subprocess
    import sys

    code = "import sys, esx, esx_envs.bench; print('evosax' in sys.modules, 'psutil' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_load_line_and_warning():
    meta = {"loadavg_start": [2.5, 1.0, 0.5], "cpu_count": 2}
    assert bench.load_line(meta) == "load=2.50/1.00/0.50"
    assert "above 1 per core (2 cores)" in bench.load_warning(meta)
    assert bench.load_warning({"loadavg_start": [1.9, 3.0, 3.0], "cpu_count": 2}) is None
    assert bench.load_line({}) == "load=?" and bench.load_warning({}) is None
