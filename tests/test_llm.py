"""LLM reasoning rewards: verifiers, the Llama decoder and its loaders, generation, ES fitness and GRPO."""
from __future__ import annotations

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
