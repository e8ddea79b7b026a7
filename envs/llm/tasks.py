"""Reasoning tasks with programmatic verifiers: Countdown, multi-digit arithmetic, GSM8K-style word problems.

Nothing here ever ``eval``s or ``exec``s model output. Countdown answers are parsed by :func:`parse_expression`, a
small recursive-descent parser over a whitelist (digits, ``+ - * /``, parentheses, spaces) with hard bounds on the
input length, nesting depth, digits per number and the size of intermediate values; it evaluates with exact
:class:`fractions.Fraction` arithmetic and returns ``None`` for anything else -- it never raises and runs in time
linear in the (bounded) input.

Every task follows one shape (:class:`Task`): ``sample(rng, n) -> list[Problem]`` and
``score(problem, completion) -> float`` in ``[0, 1]`` (1 = correct final answer). Completions are read through the
prompt template of :func:`make_prompt`: the model reasons inside ``<think> … </think>`` and puts the final answer
inside ``<answer> … </answer>``; :func:`extract_answer` reads the answer section and :func:`format_reward` scores
compliance with the template (a reward that moves quickly, useful as a sanity check).

Example:
  >>> parse_expression("(3 + 5) * 2")
  Fraction(16, 1)
  >>> parse_expression("__import__('os')") is None
  True
  >>> task = Countdown(num_numbers=3)
  >>> p = Problem(question="", answer=24, meta={"numbers": (3, 8, 1)})
  >>> task.score(p, "<think>3*8</think><answer>3 * 8 * 1</answer>")
  1.0
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, Protocol

# ----------------------------------------------------------------------------------------------------------------
# The bounded expression parser (whitelist; never eval)
# ----------------------------------------------------------------------------------------------------------------
MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 32
MAX_NUMBER_DIGITS = 9
MAX_MAGNITUDE = 10**18  # any intermediate |numerator| or |denominator| above this rejects the expression

_ALLOWED = frozenset("0123456789+-*/() ")


class _Reject(Exception):
    pass


class _Parser:
    """``expr := term (('+'|'-') term)*``; ``term := factor (('*'|'/') factor)*``;
    ``factor := number | '(' expr ')'``. No unary operators (Countdown combines the given numbers only)."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.numbers: list[int] = []

    def peek(self) -> str:
        while self.i < len(self.s) and self.s[self.i] == " ":
            self.i += 1
        return self.s[self.i] if self.i < len(self.s) else ""

    @staticmethod
    def check(x: Fraction) -> Fraction:
        if abs(x.numerator) > MAX_MAGNITUDE or x.denominator > MAX_MAGNITUDE:
            raise _Reject
        return x

    def expr(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise _Reject
        value = self.term(depth)
        while (op := self.peek()) in ("+", "-") and op:
            self.i += 1
            rhs = self.term(depth)
            value = self.check(value + rhs if op == "+" else value - rhs)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while (op := self.peek()) in ("*", "/") and op:
            self.i += 1
            rhs = self.factor(depth)
            if op == "*":
                value = self.check(value * rhs)
            else:
                if rhs == 0:
                    raise _Reject
                value = self.check(value / rhs)
        return value

    def factor(self, depth: int) -> Fraction:
        c = self.peek()
        if c == "(":
            self.i += 1
            value = self.expr(depth + 1)
            if self.peek() != ")":
                raise _Reject
            self.i += 1
            return value
        start = self.i
        while self.i < len(self.s) and self.s[self.i].isascii() and self.s[self.i].isdigit():
            self.i += 1
        digits = self.s[start:self.i]
        if not digits or len(digits) > MAX_NUMBER_DIGITS:
            raise _Reject
        n = int(digits)
        self.numbers.append(n)
        return Fraction(n)


def parse_expression(text: str, *, return_numbers: bool = False) -> Any:
    """Evaluates an arithmetic expression over non-negative integers with ``+ - * /`` and parentheses.

    Args:
      text: the expression (e.g. a Countdown answer). Anything outside the whitelist ``0-9 + - * / ( ) space``,
        longer than ``MAX_EXPRESSION_CHARS``, nested deeper than ``MAX_DEPTH``, with a number of more than
        ``MAX_NUMBER_DIGITS`` digits, dividing by zero or with an intermediate value above ``MAX_MAGNITUDE`` is
        rejected.
      return_numbers: also return the list of integer literals in order of appearance.

    Returns:
      The exact value as a :class:`~fractions.Fraction` (or ``(value, numbers)``), or ``None`` when rejected.
      Never raises.
    """
    try:
        if not isinstance(text, str) or len(text) > MAX_EXPRESSION_CHARS:
            return None
        text = text.strip()
        if not text or any(c not in _ALLOWED for c in text):
            return None
        p = _Parser(text)
        value = p.expr(0)
        if p.peek() != "":
            return None
        return (value, p.numbers) if return_numbers else value
    except (_Reject, RecursionError, ValueError, OverflowError, ZeroDivisionError, MemoryError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# The prompt template, answer extraction and format reward
# ----------------------------------------------------------------------------------------------------------------
SYSTEM_PROMPT = (
    "You are a careful assistant. Think step by step inside <think> </think>, then give only the final answer "
    "inside <answer> </answer>."
)
ANSWER_STOP = "</answer>"
_ANSWER_RE = re.compile(r"<answer>(.{0,512}?)</answer>", re.DOTALL)
_NUMBER_RE = re.compile(r"-?\d[\d,]{0,30}(?:\.\d{1,12})?")


def make_prompt(question: str, *, chat: bool = True, system: str | None = SYSTEM_PROMPT,
                prefill: str = "<think>") -> str:
    """The prompt text for one question.

    With ``chat=True`` it uses the ChatML turns of SmolLM2/Qwen-style instruct models
    (``<|im_start|>system … <|im_end|>``); the assistant turn is pre-filled with ``prefill`` (``"<think>"``) so the
    completion starts inside the reasoning section. With ``chat=False`` it is the paper's plain
    ``"User: … Assistant: <think>"`` format. ``system=None`` (or ``""``) leaves the system turn out: half the prompt
    tokens, and small instruct models then often write the sum out before answering (SmolLM2-135M on 2-digit
    addition, lenient scoring: 31% greedy accuracy without the system turn, 9% with it, ``docs/llm.md``).
    """
    if chat:
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{head}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{prefill}"
    head = f"{system}\n" if system else ""
    return f"{head}User: {question}\nAssistant: {prefill}"


def extract_answer(completion: str) -> str | None:
    """The text inside the first ``<answer> … </answer>`` (stripped), or ``None`` if there is none.

    The completion is the text generated after the prompt (which ends inside ``<think>``)."""
    if not isinstance(completion, str):
        return None
    m = _ANSWER_RE.search(completion[:8192])
    return m.group(1).strip() if m else None


def format_reward(completion: str) -> float:
    """Template compliance in ``[0, 1]``: ``0.5`` for a closed reasoning section (``</think>`` before the answer),
    ``0.5`` for a non-empty ``<answer> … </answer>`` section, nothing for text after ``</answer>``
    (generation stops at it)."""
    if not isinstance(completion, str):
        return 0.0
    completion = completion[:8192]
    score = 0.0
    think_end = completion.find("</think>")
    ans = _ANSWER_RE.search(completion)
    if think_end >= 0 and (ans is None or think_end < ans.start()):
        score += 0.5
    if ans is not None and ans.group(1).strip():
        score += 0.5
    return score


def parse_number(text: str | None) -> Fraction | None:
    """The last number in ``text`` (commas as thousands separators, optional decimals), or ``None``."""
    if not isinstance(text, str):
        return None
    found = _NUMBER_RE.findall(text[-4096:])
    if not found:
        return None
    try:
        return Fraction(found[-1].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def final_number(completion: str, *, strict: bool = True) -> Fraction | None:
    """The last number of the answer section; with ``strict=False`` a completion without an answer section
    falls back to its last number (small models rarely follow the template before training)."""
    answer = extract_answer(completion)
    if answer is None and not strict:
        answer = completion
    return parse_number(answer)


# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Problem:
    """One question. ``answer`` is the reference (a number); ``meta`` holds task-specific data."""

    question: str
    answer: Any
    meta: dict = dataclasses.field(default_factory=dict)


class Task(Protocol):
    """A task draws problems and scores completions (``1.0`` = correct)."""

    name: str

    def sample(self, rng: random.Random, n: int) -> list[Problem]: ...

    def score(self, problem: Problem, completion: str) -> float: ...


@dataclasses.dataclass(frozen=True)
class Countdown:
    """Countdown: combine the given numbers with ``+ - * /`` (each exactly once) to reach the target.

    The generator draws ``num_numbers`` integers in ``[1, max_number]`` and a target reached by a random expression
    over all of them that stays a positive integer, so every problem is solvable.
    """

    num_numbers: int = 3
    max_number: int = 20
    max_target: int = 200
    use_all: bool = True
    name: str = "countdown"

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            nums = [rng.randint(1, self.max_number) for _ in range(self.num_numbers)]
            order = nums[:]
            rng.shuffle(order)
            value, expr = Fraction(order[0]), str(order[0])
            for x in order[1:]:
                op = rng.choice("+-*/")
                nv = {"+": value + x, "-": value - x, "*": value * x, "/": value / x}[op]
                if nv.denominator != 1 or nv <= 0:
                    op, nv = "+", value + x
                value, expr = nv, f"({expr} {op} {x})"
            if value > self.max_target:
                continue
            q = (f"Using the numbers {nums}, create an equation that equals {int(value)}. "
                 "You can use + - * / and each number exactly once.")
            out.append(Problem(q, int(value), {"numbers": tuple(nums), "solution": expr}))
        return out

    def check(self, expression: str | None, numbers: Sequence[int], target: int) -> bool:
        """Whether ``expression`` uses ``numbers`` (each exactly once, all of them if ``use_all``) and equals
        ``target``."""
        if expression is None:
            return False
        expression = expression.split("=")[0] if expression.count("=") == 1 else expression
        parsed = parse_expression(expression, return_numbers=True)
        if parsed is None:
            return False
        value, used = parsed
        pool = sorted(numbers)
        if self.use_all and sorted(used) != pool:
            return False
        remaining = list(pool)
        for u in used:
            if u not in remaining:
                return False
            remaining.remove(u)
        return value == target

    def score(self, problem: Problem, completion: str) -> float:
        return float(self.check(extract_answer(completion), problem.meta["numbers"], problem.answer))


@dataclasses.dataclass(frozen=True)
class Arithmetic:
    """Multi-digit arithmetic ``a op b`` with ``digits``-digit operands; ``ops`` from ``"+-*"``."""

    digits: int = 2
    ops: str = "+"
    strict: bool = True
    name: str = "arithmetic"

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        out = []
        for _ in range(n):
            a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(self.ops)
            ans = {"+": a + b, "-": a - b, "*": a * b}[op]
            out.append(Problem(f"What is {a} {op} {b}?", ans, {"a": a, "b": b, "op": op}))
        return out

    def score(self, problem: Problem, completion: str) -> float:
        got = final_number(completion, strict=self.strict)
        return float(got is not None and got == problem.answer)


@dataclasses.dataclass(frozen=True)
class FormatTask:
    """A sanity task whose reward is :func:`format_reward` (questions from another task)."""

    base: Any = Arithmetic()
    name: str = "format"

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return self.base.sample(rng, n)

    def score(self, problem: Problem, completion: str) -> float:
        return format_reward(completion)


@dataclasses.dataclass(frozen=True)
class DigitsTask:
    """A dense sanity reward: the fraction of the completion's non-space characters that are ASCII digits (questions
    from another task). Unlike the format reward it is graded from the first generation on, even for a random model,
    so it shows within minutes whether the whole ES loop (generation, verification, update) works."""

    base: Any = Arithmetic()
    name: str = "digits"

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return self.base.sample(rng, n)

    def score(self, problem: Problem, completion: str) -> float:
        if not isinstance(completion, str):
            return 0.0
        chars = [c for c in completion[:8192].replace(ANSWER_STOP, "") if not c.isspace()]
        return sum("0" <= c <= "9" for c in chars) / len(chars) if chars else 0.0


@dataclasses.dataclass(frozen=True)
class ReasoningGym:
    """Problems from a `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ generator, scored by that
    dataset's own verifier (optional: ``pip install reasoning-gym``, the ``llm-reasoning-gym`` extra).

    ``dataset`` is a reasoning-gym name (``"basic_arithmetic"``, ``"chain_sum"``, ``"countdown"``, ...) and
    ``options`` its keyword options as ``(key, value)`` pairs (a tuple, so the task stays hashable). The answer is
    the ``<answer>`` section (``strict=False``: the completion's last line when there is none); a verifier that
    raises on a malformed answer scores ``0.0``.
    """

    dataset: str = "basic_arithmetic"
    options: tuple = ()
    strict: bool = True
    name: str = "reasoning_gym"

    def __post_init__(self):
        import reasoning_gym  # noqa: F401 - a clear ImportError here rather than at the first sample

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        import reasoning_gym

        data = reasoning_gym.create_dataset(self.dataset, size=n, seed=rng.randrange(2**31), **dict(self.options))
        return [Problem(question=e["question"], answer=e["answer"], meta={"entry": e}) for e in data]

    def score(self, problem: Problem, completion: str) -> float:
        import reasoning_gym

        answer = extract_answer(completion)
        if answer is None and not self.strict and isinstance(completion, str):
            lines = [x.strip() for x in completion[:8192].replace(ANSWER_STOP, "").splitlines() if x.strip()]
            answer = lines[-1] if lines else None
        if answer is None:
            return 0.0
        entry = problem.meta["entry"]
        try:
            fn = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
            return float(fn(answer=answer, entry=entry))
        except Exception:  # noqa: BLE001 - third-party verifiers may raise on odd strings; that is a wrong answer
            return 0.0


def gsm8k_final_answer(solution: str) -> Fraction | None:
    """The reference number of a GSM8K solution (the text after ``####``)."""
    if "####" not in solution:
        return None
    return parse_number(solution.split("####")[-1])


def load_gsm8k(path: str | pathlib.Path, *, limit: int | None = None) -> list[Problem]:
    """Reads a GSM8K-format jsonl file (one ``{"question": ..., "answer": "... #### 42"}`` per line).

    Raises:
      ValueError: a line that is not JSON, lacks the keys, or has no ``####`` final answer (with its line number).
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                q, a = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a GSM8K record ({e})") from None
            ref = gsm8k_final_answer(a)
            if ref is None:
                raise ValueError(f"{path}:{lineno}: answer has no '#### <number>' final answer")
            out.append(Problem(q, ref, {"solution": a}))
            if limit is not None and len(out) >= limit:
                break
    return out


@dataclasses.dataclass(frozen=True)
class GSM8K:
    """GSM8K-style word problems from a list of problems (:func:`load_gsm8k`); correct when the last number in the
    answer section equals the reference."""

    problems: tuple = ()
    strict: bool = True
    name: str = "gsm8k"

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        if not self.problems:
            raise ValueError("GSM8K task has no problems; pass problems=tuple(load_gsm8k(path))")
        return [rng.choice(self.problems) for _ in range(n)]

    def score(self, problem: Problem, completion: str) -> float:
        got = final_number(completion, strict=self.strict)
        return float(got is not None and got == problem.answer)


def get_task(name: str, **options) -> Task:
    """``"countdown"``, ``"arithmetic"``, ``"format"``, ``"digits"``, ``"gsm8k"`` (needs ``path=``) or
    ``"rg:<reasoning-gym dataset>"`` (:class:`ReasoningGym`), with keyword options."""
    if name.startswith("rg:"):
        strict = options.pop("strict", True)
        return ReasoningGym(name[3:], tuple(sorted(options.items())), strict=strict)
    if name == "countdown":
        return Countdown(**options)
    if name == "arithmetic":
        return Arithmetic(**options)
    if name in ("format", "digits"):
        options.pop("strict", None)
        return (FormatTask if name == "format" else DigitsTask)(Arithmetic(**options))
    if name == "gsm8k":
        path = options.pop("path", None)
        if path is None:
            raise ValueError("task 'gsm8k' needs path=<GSM8K jsonl file>")
        strict = options.pop("strict", True)
        return GSM8K(tuple(load_gsm8k(path, **options)), strict=strict)
    raise ValueError(f"unknown task {name!r}; valid: countdown, arithmetic, digits, format, gsm8k, rg:<name>")
