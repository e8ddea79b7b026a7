"""The fine-tuning controls of issue #24 and the Countdown config: held-out splits, keep-best, pass@k over k
samples, anchored weight decay, float32 master weights, per-path step sizes, the paper preset, token-pass
accounting (ES and GRPO), and user-supplied Llama / Qwen2 safetensors checkpoints run through the runner."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import esx
from esx import run
from esx_envs import cli, configs
from esx_envs.llm import es, grpo, model, tasks, tokenizer
from esx_envs.llm import task as llm_task
from esx_envs.llm.config import LLMConfig
from esx.run import ConfigError

TINY = model.LlamaConfig(vocab_size=259, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=48,
                         rope_theta=500.0)


# ----------------------------------------------------------------------------------------------------------------
# llm-countdown: generator knobs, fixed and disjoint held-out splits
# ----------------------------------------------------------------------------------------------------------------
def test_countdown_config_and_generator_knobs():
    c = configs.get_config("llm-countdown")
    assert c.KIND == "llm" and c.task == "countdown" and c.disjoint and c.tune_size > 0 and c.keep_best
    task = llm_task.make_task(dataclasses.replace(c, numbers=4, min_number=5, max_number=9, min_target=30,
                                                  max_target=60))
    for p in task.sample(random.Random(0), 50):
        nums = p.meta["numbers"]
        assert len(nums) == 4 and all(5 <= x <= 9 for x in nums) and 30 <= p.answer <= 60
        assert task.score(p, f"<answer>{p.meta['solution']}</answer>") == 1.0   # solvable
    with pytest.raises(ConfigError, match="min_number"):
        dataclasses.replace(c, min_number=41)
    # the config's held-out sets (docs/llm.md: base accuracy 32% / 16%; 61 / 43 distinct puzzles) are fixed by the
    # seed, none shared
    base = llm_task.make_task(c)
    keys = {s: [llm_task.puzzle_key(p) for p in fn(base, 0, n, disjoint=True)]
            for s, fn, n in (("val", llm_task.validation_problems, c.val_size),
                             ("tune", llm_task.tuning_problems, c.tune_size))}
    assert (len(set(keys["val"])), len(set(keys["tune"]))) == (61, 43) and not set(keys["val"]) & set(keys["tune"])
    with pytest.raises(ConfigError, match="min_target"):
        dataclasses.replace(c, min_target=0)


def _training_questions(config, generations):
    """The puzzles (:func:`llm_task.puzzle_key`: sorted numbers and target) training draws in ``generations``."""
    trainer = es.ESTrainer(cfg=TINY, params=None, tokenizer=tokenizer.ByteTokenizer(), config=config,
                           task=llm_task.SplitTask(llm_task.make_task(config), "train") if config.disjoint
                           else llm_task.make_task(config), seed=config.seed, init_state=False)
    return {llm_task.puzzle_key(p) for g in range(generations) for p in trainer.problems_for(g)}


@pytest.mark.parametrize("disjoint", [False, True])
def test_heldout_splits_are_fixed_by_seed_and_disjoint_from_training(disjoint):
    # a small problem space (2 numbers in [1, 6]), so that without the split the sets do overlap
    c = LLMConfig(model="tiny", task="countdown", numbers=2, max_number=6, population_size=16, group_size=2,
                  prompts_per_member=4, disjoint=disjoint, val_size=16, tune_size=16)
    task = llm_task.make_task(c)
    val = llm_task.validation_problems(task, 0, 16, disjoint=disjoint)
    tune = llm_task.tuning_problems(task, 0, 16, disjoint=disjoint)
    assert [p.question for p in val] == [p.question for p in llm_task.validation_problems(task, 0, 16,
                                                                                          disjoint=disjoint)]
    assert [p.question for p in val] != [p.question for p in llm_task.validation_problems(task, 1, 16,
                                                                                          disjoint=disjoint)]
    key = llm_task.puzzle_key
    held = {key(p) for p in val} | {key(p) for p in tune}
    train = _training_questions(c, 30)
    if disjoint:   # as puzzles: the same numbers in another order are the same puzzle
        assert not held & train and not {key(p) for p in val} & {key(p) for p in tune}
        assert key(tasks.Problem("a", 7, {"numbers": (3, 4)})) == key(tasks.Problem("b", 7, {"numbers": (4, 3)}))
        assert {llm_task.problem_split(p) for p in val} == {"val"}
        assert {llm_task.problem_split(p) for p in tune} == {"tune"}
    else:
        assert held & train   # what the split prevents


# ----------------------------------------------------------------------------------------------------------------
# The runner keeps the best evaluation's state; running sums survive resume
# ----------------------------------------------------------------------------------------------------------------
def _best_task(config):
    params = {"x": jnp.zeros(3)}
    strategy = esx.open_es(population_size=16, sigma=0.1, optimizer=optax.sgd(0.3))

    def fitness(p, key, data):
        return jnp.sum(esx.value(p["x"]))

    def evaluate(p, key):   # the fitness rises steadily (sum(x) ~ 1.5 per generation); the evaluation peaks
        return {"wave": -(jnp.sum(p["x"]) - 8.0) ** 2}

    return run.fitness_task(config, strategy, params, fitness, evaluate=evaluate, score="wave")


def test_keep_best_is_the_argmax_of_the_logged_evaluations(tmp_path):
    config = run.RunConfig(generations=12, eval_every=2, chunk=2, checkpoint_every=4, keep_best=True)
    task = _best_task(config)   # one setup for every call below: compiled once
    result = run.train(task, tmp_path / "a", progress=False)
    evals = [r for r in result.history if r["kind"] == "eval"]
    waves = [r["wave"] for r in evals]
    assert np.argmax(waves) not in (0, len(waves) - 1), waves   # a maximum in the middle of the run
    best = evals[int(np.argmax(waves))]
    setup, state, info = run.load_best(tmp_path / "a", task)
    assert info["generation"] == best["generation"] == state.generation and info["value"] == best["wave"]
    assert float(setup.evaluate(state, False)[0]["wave"]) == best["wave"]

    def stop(rec):   # interrupted after the best evaluation, resumed: the same best state
        if rec["generation"] >= best["generation"] + 2:
            raise KeyboardInterrupt
    run.train(task, tmp_path / "b", progress=False, callback=stop, log=lambda s: None)
    # a crash between the best checkpoint and its best.json copy leaves a stale best.json: the resumed run must
    # still compare with the kept checkpoint's own value (else a later, worse evaluation would replace it)
    (tmp_path / "b" / "best" / "best.json").write_text(json.dumps({"generation": 0, "value": -1e9}))
    run.train(task, tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    _, state_b, info_b = run.load_best(tmp_path / "b", task)
    assert info_b == info and np.array_equal(state_b.es.params["x"], state.es.params["x"])
    assert json.loads((tmp_path / "b" / "best" / "best.json").read_text()) == info   # the copy is rewritten
    (tmp_path / "b" / "best" / "best.json").unlink()             # the record travels with the state
    assert run.load_best(tmp_path / "b", task)[2] == info
    run.train(dataclasses.replace(task, config=config.replace(keep_best=False)), tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "best").exists()
    with pytest.raises(run.CheckpointError, match="no best state"):
        run.load_best(tmp_path / "c", task)


def test_a_better_state_at_a_lower_generation_replaces_the_kept_best(tmp_path):
    """A resume from a checkpoint older than the kept best can find a better evaluation at a lower generation: it
    must replace the kept state (not be deleted as the older checkpoint); after a crash that left two kept states,
    the better value is the best."""
    from esx.run import loop
    from esx.run.checkpoint import save_checkpoint

    config = run.RunConfig(generations=4, eval_every=2, chunk=2, checkpoint_every=2, keep_best=True)
    task = _best_task(config)
    run.train(task, tmp_path, progress=False)
    setup, final = run.load_run(tmp_path, task)
    assert final.generation == 4
    early = setup.initial_state()
    keeper = loop._BestKeeper(setup, tmp_path, "test", resume=False)
    keeper.offer(final, 1.0, {})
    keeper.offer(early, 2.0, {})                      # better, at generation 0 < 4
    assert len(run.list_checkpoints(tmp_path / "best")) == 1
    _, state, info = run.load_best(tmp_path, task)
    assert state.generation == 0 and info["value"] == 2.0
    assert json.loads((tmp_path / "best" / "best.json").read_text())["generation"] == 0
    keeper.offer(final, 1.5, {})                      # worse: nothing changes
    assert run.load_best(tmp_path, task)[2]["value"] == 2.0
    # a crash after writing a new best (generation 4, value 3) but before removing the old one: two are kept
    save_checkpoint(tmp_path / "best", final, setup.config, "test", keep=1 << 30,
                    extra={"score": setup.score, "value": 3.0, "best": {"generation": 4, "value": 3.0}})
    assert len(run.list_checkpoints(tmp_path / "best")) == 2
    _, state, info = run.load_best(tmp_path, task)
    assert state.generation == 4 and info["value"] == 3.0
    resumed = loop._BestKeeper(setup, tmp_path, "test", resume=True)
    assert resumed.value == 3.0


def test_cumulative_fields_are_running_sums_across_resume(tmp_path):
    config = run.RunConfig(generations=6, eval_every=3, chunk=1, checkpoint_every=2)
    setup = dataclasses.replace(_best_task(config), cumulative={"gens": "one"},
                                train_extra=lambda m, i: {"one": 1})
    full = run.train(setup, tmp_path / "a", progress=False)
    assert [r["gens"] for r in full.history if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["gens"] for r in full.history if r["kind"] == "eval"] == [0, 3, 6]

    def stop(rec):
        if rec["generation"] >= 4:
            raise KeyboardInterrupt
    run.train(setup, tmp_path / "b", progress=False, callback=stop, log=lambda s: None)
    run.train(setup, tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    assert [r["gens"] for r in run.read_metrics(tmp_path / "b") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    # several generations per chunk: every record keeps its fitness fields and its own running sum
    chunked = dataclasses.replace(setup, config=config.replace(chunk=3))
    out = run.train(chunked, tmp_path / "c", progress=False)
    train = [r for r in out.history if r["kind"] == "train"]
    assert [r["gens"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(f"{setup.fitness_name}_max" in r for r in train)


# ----------------------------------------------------------------------------------------------------------------
# pass@k, k samples per prompt, token-passes (ES)
# ----------------------------------------------------------------------------------------------------------------
def test_pass_at_k_matches_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert es.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
                assert es.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    np.testing.assert_allclose(es.pass_at_k(np.array([4, 4]), np.array([0, 2]), 2), [0.0, 5 / 6])
    with pytest.raises(ValueError):
        es.pass_at_k(2, 1, 3)


@pytest.fixture(scope="module")
def tiny_trainers():
    params = model.init_params(jax.random.key(0), TINY, scale=0.1)
    base = LLMConfig(model="tiny", task="digits", digits=1, chat=False, system_prompt="none", population_size=4,
                     group_size=2, prompts_per_member=2, max_new_tokens=3, sigma=0.05, learning_rate=0.01)
    out = {}
    for k in (1, 3):
        c = dataclasses.replace(base, samples_per_prompt=k)
        out[k] = es.ESTrainer(cfg=TINY, params=params, tokenizer=tokenizer.ByteTokenizer(), config=c,
                              task=llm_task.make_task(c), seed=0)
    return out


def test_k_samples_at_temperature_zero_equal_greedy_and_token_passes(tiny_trainers):
    one, three = tiny_trainers[1], tiny_trainers[3]
    s1, m1 = one.run_generation(one.state, 0)
    s3, m3 = three.run_generation(three.state, 0)
    for t1, t3 in zip(m1["texts"], m3["texts"]):   # [prompt 0, prompt 1] vs [p0, p0, p0, p1, p1, p1]
        assert t3 == [t for t in t1 for _ in range(3)]
    np.testing.assert_allclose(m3["rewards"], m1["rewards"], rtol=1e-6)
    assert m3["pass_at_1"] == m3["pass_at_k"] == m1["pass_at_1"]   # identical samples: pass@3 = pass@1
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.params,
                           s3.params)
    # token-passes by hand: every member reads its group's prompts (unpadded) once per sample, plus what it wrote
    tok, c = tokenizer.ByteTokenizer(), one.config
    problems = one.problems_for(0)
    prompt = sum(len(tok.encode(tasks.make_prompt(p.question, chat=False, system=None))) for p in problems)
    assert m1["token_passes"] == c.group_size * prompt + m1["tokens"]
    assert m3["token_passes"] == 3 * c.group_size * prompt + m3["tokens"] and m3["tokens"] == 3 * m1["tokens"]


@dataclasses.dataclass(frozen=True)
class _ParityTask:
    """Arithmetic questions scored 1 when the completion's first character has an even code point: about half of a
    random model's sampled answers, so k samples per prompt mix right and wrong ones."""

    base: tasks.Arithmetic = tasks.Arithmetic(digits=1)
    name: str = "parity"

    def sample(self, rng, n):
        return self.base.sample(rng, n)

    def score(self, problem, completion):
        return float(bool(completion) and ord(completion[0]) % 2 == 0)


def test_sampled_pass_at_k_is_logged_from_each_prompts_k_answers():
    """Temperature 1, 3 samples per prompt: the logged pass@1 / pass@3 equal the unbiased estimator over the
    generation's own texts, re-scored here; the generation is one where some prompt had both right and wrong
    samples, so pass@3 > pass@1 (the check cannot pass by everything scoring 0)."""
    params = model.init_params(jax.random.key(0), TINY, scale=0.1)
    c = LLMConfig(model="tiny", task="digits", digits=1, chat=False, system_prompt="none", population_size=4,
                  group_size=2, prompts_per_member=2, max_new_tokens=3, sigma=0.05, learning_rate=0.01,
                  samples_per_prompt=3, temperature=1.0)
    task = _ParityTask()
    trainer = es.ESTrainer(cfg=TINY, params=params, tokenizer=tokenizer.ByteTokenizer(), config=c, task=task,
                           seed=0)
    _, m = trainer.run_generation(trainer.state, 0)
    problems = trainer.problems_for(0)
    correct = np.zeros((4, 2), np.int64)
    for member, texts in enumerate(m["texts"]):          # [prompt 0 × 3 samples, prompt 1 × 3 samples]
        assert len(texts) == 6
        for b in range(2):
            p = problems[(member // 2) * 2 + b]
            correct[member, b] = sum(task.score(p, t) >= 1.0 for t in texts[3 * b:3 * b + 3])
    assert ((correct > 0) & (correct < 3)).any()
    assert m["pass_at_1"] == pytest.approx(float((correct / 3).mean()), abs=1e-12)
    want_k = float(np.mean(correct > 0))
    assert m["pass_at_k"] == pytest.approx(want_k, abs=1e-12) and m["pass_at_k"] > m["pass_at_1"]
    assert m["score"] == pytest.approx(float(correct.sum() / 24), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Token-passes of GRPO
# ----------------------------------------------------------------------------------------------------------------
def test_grpo_token_passes_by_hand():
    tok = tokenizer.ByteTokenizer()
    task = tasks.Arithmetic(digits=1)
    cfg = grpo.GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, learning_rate=1e-2, chat=False,
                          system=None)
    trainer = grpo.GRPOTrainer(cfg=TINY, params=model.init_params(jax.random.key(0), TINY), tokenizer=tok,
                               task=task, config=cfg, seed=3)
    rng = random.Random(3)
    total = 0
    for _ in range(2):
        problems = task.sample(rng, 2)
        rng.randrange(2**31)   # the sampling key the trainer draws
        m = trainer.step()
        prompt = sum(len(tok.encode(tasks.make_prompt(p.question, chat=False, system=None))) for p in problems)
        seq = 2 * prompt + m["tokens"]   # every (prompt, completion) sequence of the step, padding excluded
        total += seq + 3 * seq           # sampled (1 forward per token), then trained (forward + backward = 3)
        assert m["gen_token_passes"] == 4 * seq and m["token_passes"] == total


# ----------------------------------------------------------------------------------------------------------------
# Optimizer controls: anchored weight decay, per-path multipliers, the paper preset
# ----------------------------------------------------------------------------------------------------------------
def test_anchored_weight_decay_is_geometric_toward_the_anchor():
    anchor = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
    opt = optax.chain(optax.sgd(0.1), esx.anchored_weight_decay(0.25))
    state = opt.init(anchor)
    params = jax.tree_util.tree_map(lambda a: a + 4.0, anchor)
    zero = jax.tree_util.tree_map(jnp.zeros_like, anchor)
    for t in range(1, 6):
        updates, state = opt.update(zero, state, params)
        params = optax.apply_updates(params, updates)
        jax.tree_util.tree_map(lambda p, a: np.testing.assert_allclose(p - a, 4.0 * 0.75**t, rtol=1e-6), params,
                               anchor)
    # with a gradient: the SGD step plus the pull, in one chain; an explicit anchor needs no state
    g = {"w": jnp.array([1.0, 0.0, 0.0]), "b": jnp.array(2.0)}
    fixed = optax.chain(optax.sgd(0.1), esx.anchored_weight_decay(0.5, anchor=anchor))
    updates, _ = fixed.update(g, fixed.init(params), params)
    jax.tree_util.tree_map(lambda u, gg, p, a: np.testing.assert_allclose(u, -0.1 * gg - 0.5 * (p - a), rtol=1e-6),
                           updates, g, params, anchor)
    with pytest.raises(ValueError, match="rate"):
        esx.anchored_weight_decay(1.5)


def test_scale_by_path_multipliers_freeze_and_double():
    params = {"embed": jnp.ones((6, 4)), "layers": {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}}
    u = {"embed": jnp.full((6, 4), 0.3), "layers": {"w": jnp.full((4, 3), -0.7), "b": jnp.full(3, 0.1)}}
    t = esx.scale_by_path({"embed": 2.0, "layers/b": 0.0})
    out, _ = t.update(u, t.init(params), params)
    assert np.array_equal(out["embed"], 2 * u["embed"]) and np.array_equal(out["layers"]["w"], u["layers"]["w"])
    assert not np.any(out["layers"]["b"])
    with pytest.raises(ValueError, match="match no parameter"):
        esx.scale_by_path({"emb": 0.5}).init(params)

    def tell(multipliers):   # one ES step, same fitness
        opt = optax.chain(optax.sgd(0.5), esx.scale_by_path(multipliers))
        s = esx.eggroll(population_size=8, sigma=0.1, optimizer=opt)
        st = s.init(jax.random.key(1), params)
        fitness = jnp.arange(8.0) * jnp.array([1.0, -1.0] * 4)
        return s.tell(st, fitness)[0].params

    base, scaled = tell({}), tell({"embed": 0.0, "layers/w": 2.0})
    assert np.any(base["embed"] != params["embed"]) and np.array_equal(scaled["embed"], params["embed"])
    np.testing.assert_allclose(scaled["layers"]["w"] - params["layers"]["w"],
                               2 * (base["layers"]["w"] - params["layers"]["w"]), rtol=1e-5)
    assert np.any(base["layers"]["b"] != params["layers"]["b"])
    assert np.array_equal(scaled["layers"]["b"], base["layers"]["b"])


def test_llm_config_optimizer_controls():
    c = LLMConfig(model="tiny", optimizer="sgd", learning_rate=0.5, sigma=1e-2, population_size=32,
                  lr_convention="paper")
    assert c.step_size == pytest.approx(0.5 * math.sqrt(32) * 1e-4, rel=1e-12)
    assert c.step_size == esx.paper_learning_rate(0.5, sigma=1e-2, population_size=32)
    assert dataclasses.replace(c, optimizer="adam").step_size == 0.5   # Adam: the same value in both
    assert dataclasses.replace(c, lr_convention="esx").step_size == 0.5
    p = {"w": jnp.zeros(2)}
    opt = es.make_optimizer(c)
    upd, _ = opt.update({"w": jnp.ones(2)}, opt.init(p), p)
    np.testing.assert_allclose(upd["w"], -c.step_size, rtol=1e-6)
    m = LLMConfig(model="tiny", optimizer="sgd", learning_rate=0.5, lr_multipliers="embed=0.1, layers/w_*=2",
                  anchor_decay=0.01)
    assert m.multipliers == {"embed": 0.1, "layers/w_*": 2.0}
    # SGD at 0.5, then the per-path factors (embed 0.1; w_down / w_gate / w_up 2; the rest 1), then the pull
    # -0.01 (θ - θ₀) toward the parameters the optimizer state was initialised at
    params = model.init_params(jax.random.key(0), TINY)
    opt = es.make_optimizer(m)
    state = opt.init(params)
    factor = {"embed": 0.1, "norm": 1.0, **{k: 2.0 if k.startswith("w_") else 1.0 for k in params["layers"]}}
    assert sorted(k for k, v in factor.items() if v == 2.0) == ["w_down", "w_gate", "w_up"]
    for delta in (0.0, 1.0):   # at θ₀ no pull; at θ₀ + 1 every entry is pulled back by 0.01
        moved = jax.tree.map(lambda x: x + delta, params)
        upd, _ = opt.update(jax.tree.map(jnp.ones_like, params), state, moved)
        for name, f in factor.items():
            leaf = upd["layers"][name] if name in params["layers"] else upd[name]
            np.testing.assert_allclose(leaf, -0.5 * f - 0.01 * delta, rtol=1e-6, err_msg=name)
    for bad in ("embed", "embed=x", "=2", "embed=-1"):
        with pytest.raises(ConfigError, match="lr_multipliers"):
            LLMConfig(model="tiny", lr_multipliers=bad)
    with pytest.raises(ConfigError, match="lr_convention"):
        LLMConfig(lr_convention="openai")


# ----------------------------------------------------------------------------------------------------------------
# float32 master weights over a bfloat16 model
# ----------------------------------------------------------------------------------------------------------------
def test_float32_master_weights_accumulate_below_bfloat16_resolution():
    params = model.init_params(jax.random.key(0), TINY, dtype=jnp.bfloat16)
    c = LLMConfig(model="tiny", dtype="bfloat16", population_size=4, group_size=2, optimizer="sgd",
                  learning_rate=1.0, master_weights=True)
    tok = tokenizer.ByteTokenizer()
    master = es.ESTrainer(cfg=TINY, params=params, tokenizer=tok, task=llm_task.make_task(c), config=c)
    plain = es.ESTrainer(cfg=TINY, params=params, tokenizer=tok, task=llm_task.make_task(c),
                         config=dataclasses.replace(c, master_weights=False))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(master.state.params))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(plain.state.params))
    # the forward runs in bfloat16 on the cast master copy: the same logits as the bfloat16 model
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    a = model.forward(model.cast_params(master.state.params, jnp.bfloat16), ids, cfg=TINY)
    b = model.forward(params, ids, cfg=TINY)
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # a member view casts its base and noise factors, and keeps its coefficients in float32
    view = master.strategy.view(master.state, master.strategy.ask(master.state), 1)
    cast = model.cast_params(view, jnp.bfloat16)
    assert cast["layers"]["wq"].base.dtype == cast["layers"]["wq"].a.dtype == jnp.bfloat16
    assert cast["layers"]["wq"].coef.dtype == jnp.float32 and cast["norm"].eps.dtype == jnp.bfloat16
    # ten SGD steps of 1e-4 (bfloat16's spacing at 1.0 is 2**-7): the master copy moves, bfloat16 storage does not
    fitness = jnp.zeros(4)
    for trainer in (master, plain):
        st = trainer.state
        grad = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, -1e-4, x.dtype), st.params)
        apply = jax.jit(trainer.strategy.apply)
        for _ in range(10):
            st, _ = apply(st, grad, fitness)
        trainer.moved = float(jnp.max(jnp.abs(st.params["norm"].astype(jnp.float32) - 1.0)))
    assert master.moved == pytest.approx(1e-3, rel=1e-3) and plain.moved == 0.0


# ----------------------------------------------------------------------------------------------------------------
# A user's Llama / Qwen2 safetensors checkpoint runs unchanged (loader, generation, an ES step, the runner, CLI)
# ----------------------------------------------------------------------------------------------------------------
def _byte_tokenizer_json(path):
    """A byte-level BPE ``tokenizer.json`` with the ids of :class:`tokenizer.ByteTokenizer`'s 259 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bytes_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's byte -> printable character map, ids by byte value
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(printable, chars)}
    assert set(vocab) == set(bytes_to_unicode)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path))


def _write_checkpoint(folder, kind):
    from safetensors.numpy import save_file

    folder.mkdir()
    V, D, L, H, K, d, F = 259, 32, 2, 4, 2, 8, 48
    rng = np.random.RandomState(0)
    w = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(D, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(D, np.float32),
                  p + "self_attn.q_proj.weight": w(H * d, D), p + "self_attn.k_proj.weight": w(K * d, D),
                  p + "self_attn.v_proj.weight": w(K * d, D), p + "self_attn.o_proj.weight": w(D, H * d),
                  p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
                  p + "mlp.down_proj.weight": w(D, F)})
        if kind == "qwen2":
            t.update({p + "self_attn.q_proj.bias": w(H * d), p + "self_attn.k_proj.bias": w(K * d),
                      p + "self_attn.v_proj.bias": w(K * d)})
    if kind == "llama":
        t["lm_head.weight"] = w(V, D)
    save_file(t, str(folder / "model.safetensors"))
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]
    (folder / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": kind, "vocab_size": V, "hidden_size": D, "intermediate_size": F,
        "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": K, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": kind == "qwen2",
        "eos_token_id": 256, "pad_token_id": 256}))
    _byte_tokenizer_json(folder / "tokenizer.json")


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_user_checkpoint_runs_unchanged(tmp_path, kind, capsys):
    """Qwen2 (q/k/v biases, tied head) through ``esx train`` from the CLI; Llama (separate head) through the trainer
    (the loader's logits against transformers' own models: tests/test_llm.py)."""
    folder = tmp_path / kind
    _write_checkpoint(folder, kind)
    cfg, params, tok = llm_task.load_model(str(folder))
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == (kind == "qwen2")
    assert ("bq" in params["layers"]) == (kind == "qwen2") and ("lm_head" in params) == (kind == "llama")
    text = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>"
    assert tok.encode(text) == tokenizer.ByteTokenizer().encode(text) and tok.decode(tok.encode("a b")) == "a b"
    # the Countdown job on this checkpoint, with the graded digits reward and short prompts (cheap to compile)
    overrides = ["task=digits", "digits=1", "chat=false", "system_prompt=none", "generations=1", "population_size=4",
                 "group_size=2", "prompts_per_member=2", "max_new_tokens=4", "sigma=0.05", "learning_rate=0.01",
                 "val_size=2", "tune_size=2", "eval_every=1", "checkpoint_every=1"]
    if kind == "llama":
        config = configs.apply_overrides(configs.get_config("llm-countdown"), overrides)
        trainer = es.ESTrainer(cfg=cfg, params=params, tokenizer=tok, task=llm_task.make_task(config),
                               config=config)
        m = trainer.step()
        assert m["generation"] == 1 and m["tokens"] > 0 and np.isfinite(m["grad_norm"])
        assert m["token_passes"] > m["tokens"] and int(trainer.state.generation) == 1
        return
    run_dir = tmp_path / "run"
    assert cli.main(["train", "llm-countdown", f"model={folder}", *overrides, "--run-dir", str(run_dir),
                     "--no-progress"]) == 0
    recs = run.read_metrics(run_dir)
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 1 and train[0]["tokens"] > 0 and train[0]["token_passes"] > train[0]["tokens"]
    assert np.isfinite(train[0]["grad_norm"])
    assert {"val_accuracy", "tune_accuracy", "token_passes"} <= set(recs[-1])
    _, state = run.load_run(run_dir)
    assert state.generation == 1 and (run_dir / "best" / "best.json").exists()


def test_unreachable_countdown_targets_are_an_error_not_a_hang():
    task = tasks.Countdown(num_numbers=2, max_number=5, min_target=100, max_target=200)
    with pytest.raises(ValueError, match="widen the target range"):
        task.sample(random.Random(0), 1)
