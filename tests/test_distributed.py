"""Scale-out (esx.distributed): results independent of the device count, multi-process runs, errors.

The multi-device checks run in subprocesses (tests/_dist_worker.py) with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before JAX starts: one process with 8 host devices
for the device-count, noise, communication and error checks, one with 8 host devices for the strategy × shaping ×
device-count matrix, and two processes with 2 devices each under ``jax.distributed`` (started by
scripts/launch_local.sh) for the multi-host check. Sizes are tiny; the XLA backend optimisation level is lowered
to keep the compiles short (it is the same in every compared run), except in the matrix: the difference the old
z_score / group_z_score code showed (XLA recomputing the fitness inside the shaping's mean) appears only in
optimised code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx
from esx import distributed as dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_dist_worker.py"
TIMEOUT_S = 400


def _env(num_devices: int, optimize: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):  # never inherit a distributed environment from the test runner
        if name.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_")):
            del env[name]
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}" + (
        "" if optimize else " --xla_backend_optimization_level=0")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    if proc.returncode:
        pytest.fail(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three scenarios, started together (each compile is mostly single-threaded): ``(single, multi,
    matrix)`` dirs."""
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    matrix = tmp_path_factory.mktemp("matrix")
    launcher = ROOT / "scripts" / "launch_local.sh"
    procs = [_start([sys.executable, str(WORKER), "matrix", str(matrix)], _env(8, optimize=True)),
             _start([sys.executable, str(WORKER), "single", str(single)], _env(8)),
             _start(["bash", str(launcher), "2", sys.executable, str(WORKER), "multi", str(multi)], _env(2))]
    try:
        for proc in procs:
            _finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return single, multi, matrix


@pytest.fixture(scope="module")
def single_host(runs):
    return runs[0], json.loads((runs[0] / "single.json").read_text())


@pytest.fixture(scope="module")
def matrix(runs):
    return json.loads((runs[2] / "matrix.json").read_text())


def _params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ---------------------------------------------------------------------------------------------------------------
# one host, 8 devices


def test_worker_sees_eight_devices_and_training_moves(single_host):
    _, res = single_host
    assert res["num_devices"] == 8
    assert res["moved"] > 1e-2  # the compared parameters are not just the initial ones


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_gather_is_bit_identical_to_step_for_any_device_count(single_host, num_devices):
    _, res = single_host
    assert res[f"gather_{num_devices}"]["bitwise"], res[f"gather_{num_devices}"]


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_reduce_matches_step_to_rounding(single_host, num_devices):
    _, res = single_host
    assert res[f"reduce_{num_devices}"]["rel"] <= 1e-6, res[f"reduce_{num_devices}"]


def test_scan_with_shard_strategy_matches_step(single_host):
    _, res = single_host
    assert res["scan_4"]["bitwise"], res["scan_4"]
    assert res["scan_aux_shape"] == [5, 16, 1]  # generations, members (all-gathered), aux


def test_member_noise_does_not_depend_on_device(single_host):
    _, res = single_host
    assert res["noise_same"] == [True, True]  # reversed 8-device mesh; 2-device mesh


def test_non_divisible_population_is_an_error(single_host):
    _, res = single_host
    msg = res["nondivisible_error"]
    assert msg is not None, "sharded_step accepted 6 pairs on 4 devices"
    for part in ("population_size=12", "6 antithetic pairs", "4 devices", "multiple of 8"):
        assert part in msg


@pytest.mark.parametrize("placement", dist.PLACEMENTS)
def test_communication_bytes_match_compiled_collectives(single_host, placement):
    _, res = single_host
    model, hlo = res[f"model_{placement}"], res[f"hlo_{placement}"]
    assert hlo.get("all-gather") == model["fitness_allgather_bytes"] == 4 * 16
    assert hlo.get("all-reduce", 0) == model["gradient_allreduce_bytes"]
    assert set(hlo) <= {"all-gather", "all-reduce"}
    if placement == "reduce":
        assert model["gradient_allreduce_bytes"] == 4 * (3 * 4 + 4)


# ---------------------------------------------------------------------------------------------------------------
# one host, 8 devices: every strategy x shaping x device count against esx.step

SHAPING_NAMES = sorted([*esx.shaping.SHAPINGS, "group_z_score"])
MATRIX = ([(f"{s}-{sh}", "gather") for s in ("eggroll", "open_es") for sh in SHAPING_NAMES]
          + [("int_eggroll-pair_signs", p) for p in dist.PLACEMENTS])
#: metrics computed with float reductions in esx.base (not order-pinned): guaranteed to rounding only
ROUNDED_METRICS = {"fitness_mean", "fitness_std", "fitness_max", "fitness_min", "grad_norm", "update_norm_lowrank",
                   "update_norm_full", "alpha"}
#: a fitness that depends on the member batch size, made bit-identical by member_batch (when esx has it)
MEMBER_BATCH = "eggroll_dense_member_batch_4-z_score"


def test_matrix_covers_every_registered_shaping(matrix):
    assert matrix["num_devices"] == 8
    covered = {key.split("/")[0] for key in matrix if "/" in key} - {MEMBER_BATCH}
    assert covered == {name for name, _ in MATRIX}
    assert all(matrix[k]["moved"] > 1e-2 for k in matrix if "/" in k)  # 3 generations moved the parameters


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
@pytest.mark.parametrize("problem,placement", MATRIX)
def test_state_is_bit_identical_to_step_for_every_shaping(matrix, problem, placement, num_devices):
    """3 generations of sharded_step vs esx.step: parameters and optimizer state bit for bit; the metrics that are
    guaranteed exact, exactly; the float statistics to rounding (in practice identical too: checked below)."""
    res = matrix[f"{problem}/{placement}/{num_devices}"]
    assert res["params"] and res["opt_state"], res
    for field, rel in res["metrics"].items():
        if field in ROUNDED_METRICS:
            assert rel <= 1e-6, (field, res)
        else:
            assert rel == 0.0, (field, res)


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_member_batch_makes_a_batch_dependent_fitness_bit_identical(matrix, num_devices):
    """esx.dense of shared data rounds differently with N/D members than with N; member_batch=4 (a divisor of N/D)
    gives esx.step and every device the same 4-member chunks (docs/distributed.md)."""
    key = f"{MEMBER_BATCH}/gather/{num_devices}"
    if key not in matrix:
        pytest.skip("this esx has no member_batch")
    assert matrix[key]["params"] and matrix[key]["opt_state"], matrix[key]


def test_metrics_are_identical_in_the_matrix(matrix):
    """Not guaranteed (docs/distributed.md), but true of every run of the matrix: every metric bit-identical."""
    differ = {k: {f: r for f, r in v["metrics"].items() if r} for k, v in matrix.items() if "/" in k}
    assert not any(differ.values()), {k: v for k, v in differ.items() if v}


def test_sharded_evaluate_passes_data_per_member(matrix):
    assert matrix["data_per_member"] == {"equal": True, "rows": True}


def test_reproducible_sum_does_not_depend_on_order():
    rng = np.random.default_rng(0)
    for n in (1, 7, 32, 1000, 70_000):
        x = (rng.standard_normal(n) * rng.choice([1e-4, 1.0, 1e4], n)).astype(np.float32)
        exact = np.sum(x.astype(np.float64))
        sums = [esx.shaping.reproducible_sum(jnp.asarray(x)),
                jax.jit(esx.shaping.reproducible_sum)(jnp.asarray(x[::-1])),
                jax.vmap(esx.shaping.reproducible_sum)(jnp.asarray(x[rng.permutation(n)])[None])[0]]
        assert len({np.asarray(v).tobytes() for v in sums}) == 1, (n, sums)
        assert abs(float(sums[0]) - exact) <= 4 * np.spacing(np.float32(abs(exact))) + 1e-6 * np.abs(x).max()
    m = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    np.testing.assert_allclose(esx.shaping.reproducible_sum(m, axis=0), m.sum(0), rtol=1e-6, atol=1e-6)
    assert float(esx.shaping.reproducible_sum(jnp.zeros(4))) == 0.0
    assert np.isposinf(esx.shaping.reproducible_sum(jnp.array([1.0, np.inf])))
    assert np.isnan(esx.shaping.reproducible_sum(jnp.array([1.0, np.nan])))


# ---------------------------------------------------------------------------------------------------------------
# two processes under jax.distributed


def test_two_processes_match_one_process(runs):
    single, multi, _ = runs
    ref = _params(single / "reference.npz")
    for pid in (0, 1):
        info = json.loads((multi / f"multi_{pid}.json").read_text())
        assert info == {"process_id": pid, "process_count": 2, "device_count": 4, "local_device_count": 2,
                        "config_source": "jax"}
        gather = _params(multi / f"multi_gather_{pid}.npz")
        reduce = _params(multi / f"multi_reduce_{pid}.npz")
        for name in ref:
            np.testing.assert_array_equal(gather[name], ref[name])
            rel = np.linalg.norm(reduce[name] - ref[name]) / np.linalg.norm(ref[name])
            assert rel <= 1e-6, (name, rel)


# ---------------------------------------------------------------------------------------------------------------
# in-process: pure helpers


def _strategy(population_size: int, **kw) -> esx.Strategy:
    return esx.eggroll(population_size=population_size, sigma=0.1, optimizer=optax.sgd(0.1), **kw)


def test_pairs_per_device():
    assert dist.pairs_per_device(_strategy(16), 8) == 1
    assert dist.pairs_per_device(_strategy(12, antithetic=False), 4) == 3
    with pytest.raises(ValueError, match=r"population_size=12 has 6 antithetic pairs.*4 devices"):
        dist.pairs_per_device(_strategy(12), 4)
    with pytest.raises(ValueError, match=r"population_size=10 has 10 members.*4 devices.*multiple of 4"):
        dist.pairs_per_device(_strategy(10, antithetic=False), 4)


def test_bad_options_are_errors():
    mesh = dist.make_mesh(jax.devices()[:1])
    strategy = _strategy(4)
    state = strategy.init(jax.random.key(0), {"w": jnp.zeros((2, 2))})
    fitness = lambda view, key, data: jnp.zeros(())  # noqa: E731
    with pytest.raises(ValueError, match="placement='ring'"):
        dist.sharded_step(strategy, state, fitness, jax.random.key(1), mesh=mesh, placement="ring")
    with pytest.raises(ValueError, match="axis='data'"):
        dist.sharded_step(strategy, state, fitness, jax.random.key(1), mesh=mesh, axis="data")
    with pytest.raises(ValueError, match="placement"):
        dist.shard_strategy(strategy, placement="psum")
    assert dist.shard_strategy(strategy) is dist.shard_strategy(strategy)  # cached: no recompiles


def test_first_host():
    assert dist.first_host("node7") == "node7"
    assert dist.first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert dist.first_host("a1,b[1-2]") == "a1"
    assert dist.first_host("rack[2-3]-n[10-12]") == "rack2-n10"


def test_config_from_env():
    assert dist.config_from_env({}) is None
    assert dist.config_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1",
                                 "JAX_PROCESS_ID": "0"}) is None
    cfg = dist.config_from_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1", "JAX_COORDINATOR_PORT": "1234",
                                "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1",
                                "SLURM_NTASKS": "9", "SLURM_PROCID": "8", "SLURM_NODELIST": "x"})
    assert cfg == dist.DistributedConfig("10.0.0.1:1234", 4, 3, (0, 1), "jax")
    cfg = dist.config_from_env({"SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_JOB_ID": "123456",
                                "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NODELIST": "other"})
    assert cfg == dist.DistributedConfig(f"gpu07:{20000 + 123456 % 20000}", 16, 5, None, "slurm")
    cfg = dist.config_from_env({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_NODELIST": "n1,n2",
                                "MASTER_PORT": "4444"})
    assert cfg.coordinator_address == "n1:4444"
    cfg = dist.config_from_env({"MASTER_ADDR": "m", "WORLD_SIZE": "2", "RANK": "1"})
    assert cfg == dist.DistributedConfig("m:29500", 2, 1, None, "torch")
    with pytest.raises(ValueError, match="process_id=2"):
        dist.config_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        dist.config_from_env({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})


def test_initialize_from_env_single_process_is_a_no_op():
    assert dist.initialize_from_env(environ={}) is None
    assert dist.initialize_from_env(coordinator_address="h:1", num_processes=1, process_id=0) is None
    with pytest.raises(ValueError, match="pass all of"):
        dist.initialize_from_env(num_processes=2)


def test_communication_bytes_for_the_documented_mlp():
    shapes = {f"layer{i}": {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
                            "b": jax.ShapeDtypeStruct((1024,), jnp.float32)} for i in range(3)}
    strategy = _strategy(4096, rank=1)
    gather = dist.communication_bytes(strategy, shapes, 8, "gather")
    reduce = dist.communication_bytes(strategy, shapes, 8, "reduce")
    assert gather["num_params"] == reduce["num_params"] == 3 * (1024 * 1024 + 1024)
    assert gather["payload_bytes"] == 4 * 4096 and gather["sent_bytes_per_device"] == 4 * 4096 * 7 // 8
    assert reduce["gradient_allreduce_bytes"] == 4 * 3 * (1024 * 1024 + 1024)
    assert reduce["sent_bytes_per_device"] == 4 * 4096 * 7 // 8 + 2 * 7 * 4 * 3 * (1024 * 1024 + 1024) // 8


def test_collective_bytes_reads_combined_all_reduces():
    hlo = "\n".join([
        "  %all_gather.3 = f32[64]{0} all-gather(%x), channel_id=1, dimensions={0}",
        "  %all-reduce = (f32[64]{0}, f32[64,64]{1,0}, /*index=5*/bf16[8,2]{1,0}) all-reduce(%a, %b, /*index=5*/%c)",
        "  %get-tuple-element.1 = f32[64]{0} get-tuple-element(%all-reduce), index=0",
        "  %add = f32[64]{0} add(%all_gather.3, %get-tuple-element.1)",
    ])
    assert dist.collective_bytes(hlo) == {"all-gather": 256, "all-reduce": 4 * 64 + 4 * 64 * 64 + 2 * 16}


def test_sharded_step_compiles_once_across_generations():
    """Regression: the first call's inputs must already carry the sharding the outputs have (one compile)."""
    params = {"w": jnp.zeros((8, 8))}
    fit = lambda p, k, d: -jnp.sum(esx.dense(jnp.ones((1, 8)), p["w"]) ** 2)
    strategy = esx.eggroll(population_size=8, sigma=0.1, optimizer=optax.sgd(0.1))
    state = strategy.init(jax.random.key(0), params)
    mesh = dist.make_mesh(jax.devices()[:1])
    before = dist._sharded_step._cache_size()
    for g in range(3):
        state, _ = dist.sharded_step(strategy, state, fit, jax.random.key(g), mesh=mesh)
    assert dist._sharded_step._cache_size() == before + 1
    assert int(state.generation) == 3
