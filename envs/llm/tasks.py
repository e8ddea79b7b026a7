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

What each verifier accepts (the rules; ``tests/test_verifiers_redteam.py`` attacks each one)
------------------------------------------------------------------------------------------
**The answer section (every task).** A completion has an answer section when it contains exactly one ``<answer>``
and exactly one ``</answer>``, in that order, with at most ``MAX_ANSWER_CHARS`` (512) characters between them; the
section is that text with ASCII whitespace stripped from both ends. No answer tag at all means "no answer section";
anything else -- repeated, nested, unclosed or reversed tags, a stray ``</answer>`` -- is a *malformed* completion
and scores 0 in every mode (lenient included) and gets no answer credit from :func:`format_reward`. Tags are
case-sensitive.

**A number** is written in ASCII: an optional sign (``-`` or ``+``) directly before the digits, then ``0`` or digits
without a leading zero, either plain (``1234``) or grouped by commas in groups of exactly three (``1,234``), then an
optional decimal part (``.5``, ``900.0``). Its value is read whole and exactly (``Fraction``; at most
``MAX_NUMBER_CHARS`` characters), so a long number is never split and never equals a small target. A number is
*malformed* when it is not of that form (``7,2``, ``1,2345``, ``072``, ``1.2.3``, non-ASCII digits such as ``٧٢`` or
``７２``) or when it is glued to a neighbour: a letter or digit of any script, ``_``, a non-ASCII character
(zero-width spaces and other invisible characters included) on either side, a ``.`` or ``,`` before it, a doubled
sign (``--7``), or a sign separated from the digits by spaces or tabs (``- 7``). A ``-`` or ``+`` right after a digit
or a closing bracket (spaces or tabs between allowed) is an operator, not a sign. A ``.`` or ``,`` after a number that
is not followed by a digit is punctuation (``It is 72.``).

**Arithmetic and GSM8K** (``strict=True``). The answer section must contain exactly one number, well-formed and
unglued, whose exact value equals the reference. Besides that number (and its attached sign) the section may hold only
ASCII letters, ASCII whitespace and the punctuation ``. , : ; ! ? ' " $ % ( ) [ ] = * #``, so words and units are
allowed (``10 apples``, ``It is -7 degrees``, ``$1,200``, ``**72**``). Two numbers (``72 or 73``, ``40 + 32 = 72``),
a malformed number, any other character (another ``+``/``-``, ``/``, ``^``, ``~``, control characters, any non-ASCII
character) score 0. **Lenient mode** (``strict=False``, ``--lenient``): a completion *without any answer tag* is
read by its last number (:func:`parse_number`), which must be well-formed and unglued; a malformed last number scores
0 (it never falls back to an earlier one). A completion with an answer section is read as in strict mode.

**Countdown.** The answer section is ASCII and is either an expression, or an equation with exactly one ``=`` whose
one side is an expression and whose other side is the target written as a plain integer (``3*8*1 = 24`` and
``24 = 3*8*1`` pass, ``3*8*1 = 25`` and ``3*8 = 24*1`` fail). The expression uses only the given numbers (each at
most once; each exactly once when ``use_all``, the default), written as plain integers without leading zeros, with
``+ - * /``, parentheses and spaces (any ASCII whitespace around each side) -- no unary minus, powers, decimals or
implicit multiplication -- and is evaluated with the usual precedence, exactly (``Fraction``); its value must equal
the target. **Lenient mode** (``strict=False``): a completion *without any answer tag* is read by its last run of
the characters ``0-9 + - * / ( ) = space`` that contains a digit (:func:`last_equation`; ``"the equation
10 = 4 + 6."`` gives ``10 = 4 + 6``), checked by the same rules; malformed tags score 0.

**reasoning-gym** (:class:`ReasoningGym`). The answer is the answer section (lenient: the last non-empty line of a
completion without any answer tag); a malformed completion scores 0. The answer must not contain control or
invisible (format) characters, and must be ASCII when the reference answer is. ``countdown`` and ``puzzle24``
answers are checked by esx's Countdown rules (target from the entry, or 24; every given number exactly once; unary
minus allowed, as in reasoning-gym's own reference solutions) instead of reasoning-gym's ``sympy.parse_expr``, which
evaluates its input and does not check which numbers ``puzzle24`` answers use. When the reference answer is a plain
number, the answer is read as an Arithmetic answer section and scores 1 when its value equals the reference, or when
the dataset's verifier gives that number full credit (a dataset's rounding tolerance). Everything else is scored by
the dataset's verifier; the score is 1 only for full credit, else 0 (reasoning-gym's partial credit for a wrong answer
that contains the reference, and its consolation rewards for well-formed wrong answers, are dropped).

Example:
  >>> parse_expression("(3 + 5) * 2")
  Fraction(16, 1)
  >>> parse_expression("__import__('os')") is None
  True
  >>> task = Countdown(num_numbers=3)
  >>> p = Problem(question="", answer=24, meta={"numbers": (3, 8, 1)})
  >>> task.score(p, "<think>3*8</think><answer>3 * 8 * 1</answer>")
  1.0
  >>> task.score(p, "<think>3*8</think><answer>3 * 8 * 1 = 25</answer>")
  0.0
  >>> Arithmetic().score(Problem("What is 40 + 32?", 72), "<answer>1000000000000000000000000000000072</answer>")
  0.0
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import random
import re
import unicodedata
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
_ASCII_WS = " \t\n\r\f\v"


class _Reject(Exception):
    pass


class _Parser:
    """``expr := term (('+'|'-') term)*``; ``term := factor (('*'|'/') factor)*``;
    ``factor := number | '(' expr ')'`` (``| '-' factor`` with ``unary_minus``). ``number`` is ``0`` or digits
    without a leading zero. No other unary operators (Countdown combines the given numbers only)."""

    def __init__(self, text: str, unary_minus: bool = False):
        self.s = text
        self.i = 0
        self.unary_minus = unary_minus
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
        if depth > MAX_DEPTH:
            raise _Reject
        c = self.peek()
        if c == "-" and self.unary_minus:
            self.i += 1
            return -self.factor(depth + 1)
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
        if not digits or len(digits) > MAX_NUMBER_DIGITS or (len(digits) > 1 and digits[0] == "0"):
            raise _Reject
        n = int(digits)
        self.numbers.append(n)
        return Fraction(n)


def parse_expression(text: str, *, return_numbers: bool = False, unary_minus: bool = False) -> Any:
    """Evaluates an arithmetic expression over non-negative integers with ``+ - * /`` and parentheses.

    Args:
      text: the expression (e.g. a Countdown answer); ASCII whitespace around it is ignored. Anything outside the
        whitelist ``0-9 + - * / ( ) space``, longer than ``MAX_EXPRESSION_CHARS``, nested deeper than
        ``MAX_DEPTH``, with a number of more than ``MAX_NUMBER_DIGITS`` digits or with a leading zero (``07``),
        dividing by zero or with an intermediate value above ``MAX_MAGNITUDE`` is rejected.
      return_numbers: also return the list of integer literals in order of appearance.
      unary_minus: also accept a unary minus (``-3 + 5``, ``2 * -(1 + 2)``); off by default.

    Returns:
      The exact value as a :class:`~fractions.Fraction` (or ``(value, numbers)``), or ``None`` when rejected.
      Never raises.
    """
    try:
        if not isinstance(text, str) or len(text) > MAX_EXPRESSION_CHARS:
            return None
        text = text.strip(_ASCII_WS)
        if not text or any(c not in _ALLOWED for c in text):
            return None
        p = _Parser(text, unary_minus=unary_minus)
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
ANSWER_START = "<answer>"
MAX_ANSWER_CHARS = 512  # a longer answer section is malformed
MAX_NUMBER_CHARS = 1000  # a longer number is malformed (it could not equal any reference anyway)

# A run of decimal digits of any script joined by single '.' or ',' (Unicode \d, so that non-ASCII digits are found
# and then rejected, never skipped); whether the run is a well-formed number is decided by _WELL_FORMED_RE.
_RUN_RE = re.compile(r"\d+(?:[.,]\d+)*")
_WELL_FORMED = r"(?:0|[1-9][0-9]{0,2}(?:,[0-9]{3})+|[1-9][0-9]*)(?:\.[0-9]+)?"
_WELL_FORMED_RE = re.compile(_WELL_FORMED)
_SIGNED_NUMBER_RE = re.compile(r"[+-]?" + _WELL_FORMED)
# What an answer section may hold besides its one number (and that number's attached sign): ASCII letters,
# whitespace and punctuation that cannot change a number's value.
_ANSWER_TEXT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \t\n\r.,:;!?'\"$%()[]=*#")
_BLANK = " \t"


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


_ABSENT, _MALFORMED, _OK = "absent", "malformed", "ok"


def _answer_section(completion: Any) -> tuple[str, str | None]:
    """``("ok", text)`` for exactly one ``<answer> … </answer>`` (text stripped of ASCII whitespace),
    ``("absent", None)`` when the completion has no answer tag at all, ``("malformed", None)`` otherwise (repeated,
    nested, unclosed or reversed tags, an over-long section, not a string)."""
    if not isinstance(completion, str):
        return _MALFORMED, None
    n_open, n_close = completion.count(ANSWER_START), completion.count(ANSWER_STOP)
    if n_open == 0 and n_close == 0:
        return _ABSENT, None
    if n_open != 1 or n_close != 1:
        return _MALFORMED, None
    start = completion.find(ANSWER_START) + len(ANSWER_START)
    end = completion.find(ANSWER_STOP)
    if end < start or end - start > MAX_ANSWER_CHARS:
        return _MALFORMED, None
    return _OK, completion[start:end].strip(_ASCII_WS)


def extract_answer(completion: str) -> str | None:
    """The text of the completion's answer section (stripped of ASCII whitespace), or ``None`` when it has none or
    the tags are malformed (not exactly one ``<answer>`` followed by exactly one ``</answer>``, at most
    ``MAX_ANSWER_CHARS`` apart; see the module docstring).

    The completion is the text generated after the prompt (which ends inside ``<think>``)."""
    kind, text = _answer_section(completion)
    return text if kind == _OK else None


def format_reward(completion: str) -> float:
    """Template compliance in ``[0, 1]``: ``0.5`` for a closed reasoning section (``</think>`` before the first
    ``<answer>``), ``0.5`` for a non-empty, well-formed ``<answer> … </answer>`` section (exactly one pair of tags),
    nothing for text after ``</answer>`` (generation stops at it)."""
    if not isinstance(completion, str):
        return 0.0
    score = 0.0
    think_end = completion.find("</think>")
    first_open = completion.find(ANSWER_START)
    if think_end >= 0 and (first_open < 0 or think_end < first_open):
        score += 0.5
    kind, text = _answer_section(completion)
    if kind == _OK and text:
        score += 0.5
    return score


def _free(c: str) -> bool:
    """Whether ``c`` may stand next to a number: ASCII, not a letter, digit or ``_``."""
    return c.isascii() and not c.isalnum() and c != "_"


def _is_operator(text: str, k: int) -> bool:
    """Whether the ``+``/``-`` at ``text[k]`` is a binary operator: the previous non-blank character is an ASCII
    digit or a closing bracket."""
    j = k - 1
    while j >= 0 and text[j] in _BLANK:
        j -= 1
    return j >= 0 and (("0" <= text[j] <= "9") or text[j] in ")]}")


def _read_number(text: str, m: re.Match) -> tuple[Fraction, int] | None:
    """``(value, start)`` of the digit run ``m`` of ``text`` with its sign (``start``: where the number begins,
    sign included), or ``None`` when it is malformed or glued to its neighbours (the rules of the module
    docstring)."""
    run = m.group()
    start, end = m.span()
    if len(run) > MAX_NUMBER_CHARS or not run.isascii() or not _WELL_FORMED_RE.fullmatch(run):
        return None
    if end < len(text) and not _free(text[end]):
        return None
    sign, left = 1, start - 1
    if left >= 0 and text[left] in "+-" and not _is_operator(text, left):
        sign = -1 if text[left] == "-" else 1
        start, left = left, left - 1  # the number begins at its sign; ``left``: the character before it
        if left >= 0 and (not _free(text[left]) or text[left] in "+-.,"):
            return None
    elif left >= 0:
        if not _free(text[left]) or text[left] in ".,":
            return None
        k = left
        while k >= 0 and text[k] in _BLANK:
            k -= 1
        if k != left and k >= 0 and text[k] in "+-" and not _is_operator(text, k):
            return None  # a sign set apart from its digits on the same line: "- 7"
    try:
        return sign * Fraction(run.replace(",", "")), start
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text: str | None) -> Fraction | None:
    """The value of the last number in ``text`` (lenient reading), or ``None`` when there is none or the last one is
    malformed or glued to its neighbours -- it never falls back to an earlier number. See the module docstring for
    what a well-formed number is (ASCII digits, an attached sign, commas only between groups of three, optional
    decimals)."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _RUN_RE.finditer(text):
        pass
    number = None if last is None else _read_number(text, last)
    return None if number is None else number[0]


def parse_single_number(text: str | None) -> Fraction | None:
    """The value of the only number in ``text`` (strict reading of an answer section), or ``None`` when ``text``
    has no number or more than one, its number is malformed or glued to its neighbours, or the rest of ``text``
    has a character other than ASCII letters, whitespace and ``. , : ; ! ? ' " $ % ( ) [ ] = * #`` (a ``+`` or
    ``-`` only as the number's attached sign)."""
    if not isinstance(text, str):
        return None
    runs = list(_RUN_RE.finditer(text))
    if len(runs) != 1:
        return None
    number = _read_number(text, runs[0])
    if number is None:
        return None
    value, start = number
    if any(c not in _ANSWER_TEXT_CHARS for c in text[:start]) or \
            any(c not in _ANSWER_TEXT_CHARS for c in text[runs[0].end():]):
        return None
    return value


def final_number(completion: str, *, strict: bool = True) -> Fraction | None:
    """The number of the answer section (:func:`parse_single_number`: exactly one well-formed number); with
    ``strict=False`` a completion without any answer tag is read by its last number (:func:`parse_number`; small
    models rarely follow the template before training). Malformed answer tags give ``None`` in both modes."""
    kind, text = _answer_section(completion)
    if kind == _OK:
        return parse_single_number(text)
    if kind == _ABSENT and not strict:
        return parse_number(completion)
    return None


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


_TARGET_LITERAL_RE = re.compile(r"0|[1-9][0-9]*")


@dataclasses.dataclass(frozen=True)
class Countdown:
    """Countdown: combine the given numbers with ``+ - * /`` (each exactly once) to reach the target.

    The generator draws ``num_numbers`` integers in ``[min_number, max_number]`` and a target in
    ``[min_target, max_target]`` reached by a random expression over all of them that stays a positive integer (a
    draw whose target falls outside is drawn again), so every problem is solvable. The answer is an expression, or an
    equation whose other side is the target (``expr = 24`` or ``24 = expr``); see :meth:`check` and the module
    docstring. ``unary_minus`` additionally accepts a unary minus (off: the game combines the given numbers only).
    """

    num_numbers: int = 3
    max_number: int = 20
    max_target: int = 200
    min_number: int = 1
    min_target: int = 1
    use_all: bool = True
    unary_minus: bool = False
    name: str = "countdown"
    strict: bool = True

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        out, rejected = [], 0
        while len(out) < n:
            if rejected > 10_000 * max(n, 1):   # nothing drawn lands in the target range: say so, never hang
                raise ValueError(
                    f"Countdown: no target in [{self.min_target}, {self.max_target}] in {rejected} draws of "
                    f"{self.num_numbers} numbers in [{self.min_number}, {self.max_number}]; widen the target range")
            nums = [rng.randint(self.min_number, self.max_number) for _ in range(self.num_numbers)]
            order = nums[:]
            rng.shuffle(order)
            value, expr = Fraction(order[0]), str(order[0])
            for x in order[1:]:
                op = rng.choice("+-*/")
                nv = {"+": value + x, "-": value - x, "*": value * x, "/": value / x}[op]
                if nv.denominator != 1 or nv <= 0:
                    op, nv = "+", value + x
                value, expr = nv, f"({expr} {op} {x})"
            if not self.min_target <= value <= self.max_target:
                rejected += 1
                continue
            q = (f"Using the numbers {nums}, create an equation that equals {int(value)}. "
                 "You can use + - * / and each number exactly once.")
            out.append(Problem(q, int(value), {"numbers": tuple(nums), "solution": expr}))
        return out

    def check(self, expression: str | None, numbers: Sequence[int], target: int) -> bool:
        """Whether the answer ``expression`` reaches ``target`` with ``numbers`` (each at most once, all of them
        exactly once if ``use_all``).

        ``expression`` is an expression, or an equation with exactly one ``=`` one side of which is an expression
        and the other the target as a plain integer (``(3 + 5) * 2 = 16`` or ``16 = (3 + 5) * 2``); both sides
        expressions, a wrong target side, several ``=`` or any non-ASCII character are rejected."""
        if not isinstance(expression, str) or not expression.isascii():
            return False
        sides = expression.split("=")
        if len(sides) == 1:
            return self._check_expression(sides[0], numbers, target)
        if len(sides) != 2:
            return False
        left, right = (x.strip(_ASCII_WS) for x in sides)
        return ((self._is_target(right, target) and self._check_expression(left, numbers, target))
                or (self._is_target(left, target) and self._check_expression(right, numbers, target)))

    @staticmethod
    def _is_target(text: str, target: int) -> bool:
        return len(text) <= 30 and _TARGET_LITERAL_RE.fullmatch(text) is not None and int(text) == target

    def _check_expression(self, expression: str, numbers: Sequence[int], target: int) -> bool:
        parsed = parse_expression(expression, return_numbers=True, unary_minus=self.unary_minus)
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
        status, section = _answer_section(completion)
        if status == _ABSENT and not self.strict:
            section = last_equation(completion)
        return float(self.check(section if status != _MALFORMED else None, problem.meta["numbers"],
                                problem.answer))


_EQUATION_RUN_RE = re.compile(r"[0-9+\-*/() =]+")


def last_equation(text: str) -> str | None:
    """The lenient Countdown answer of a completion without answer tags: its last run of the characters
    ``0-9 + - * / ( ) = space`` that holds a digit, stripped of spaces (``None`` when there is none); then checked
    by the same rules as an answer section."""
    if not isinstance(text, str):
        return None
    runs = [r.strip(" ") for r in _EQUATION_RUN_RE.findall(text) if any(ch.isdigit() for ch in r)]
    return runs[-1] if runs else None


@dataclasses.dataclass(frozen=True)
class Arithmetic:
    """Multi-digit arithmetic ``a op b`` with ``digits``-digit operands; ``ops`` from ``"+-*"``.

    Correct when the answer section holds exactly one well-formed ASCII number equal to the answer
    (:func:`final_number`; ``strict=False``: the last number of a completion without any answer tag)."""

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


_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})  # control, format (zero-width), private, unassigned
_RG_COUNTDOWN_TARGETS = {"countdown": None, "puzzle24": 24}  # None: the entry's metadata["target"]


def score_reasoning_gym_answer(answer: str | None, entry: dict, verify) -> float:
    """esx's rules around a reasoning-gym verifier (the module docstring, "reasoning-gym"): ``1.0`` or ``0.0``.

    Args:
      answer: the extracted answer (``None``: none).
      entry: the reasoning-gym dataset entry (``question``, ``answer``, ``metadata``).
      verify: the dataset's verifier, ``verify(answer=..., entry=...) -> float`` (full credit ``1.0``); an
        exception from it is a wrong answer.
    """
    if not isinstance(answer, str) or not answer:
        return 0.0
    if any(unicodedata.category(c) in _INVISIBLE_CATEGORIES and c not in "\t\n\r" for c in answer):
        return 0.0
    reference = entry.get("answer")
    reference = reference if isinstance(reference, str) else str(reference)
    if reference.isascii() and not answer.isascii():
        return 0.0
    metadata = entry.get("metadata") or {}
    source = metadata.get("source_dataset")
    if source in _RG_COUNTDOWN_TARGETS:
        target = _RG_COUNTDOWN_TARGETS[source]
        target = metadata.get("target") if target is None else target
        numbers = metadata.get("numbers")
        if not isinstance(target, int) or not numbers:
            return 0.0
        return float(Countdown(use_all=True, unary_minus=True).check(answer, numbers, target))
    if _SIGNED_NUMBER_RE.fullmatch(reference.strip(_ASCII_WS)):
        got = parse_single_number(answer)
        if got is None:
            return 0.0
        if got == parse_single_number(reference):
            return 1.0
        # the verifier sees only the number (sign and digits, commas dropped): it can grant a rounding tolerance
        digits = _RUN_RE.search(answer).group().replace(",", "")
        answer = ("-" if got < 0 else "") + digits
    try:
        return 1.0 if float(verify(answer=answer, entry=entry)) >= 1.0 else 0.0
    except Exception:  # noqa: BLE001 - third-party verifiers may raise on odd strings; that is a wrong answer
        return 0.0


#: reasoning-gym datasets whose own verifiers run the model's text through ``eval`` (``n_queens``,
#: ``binary_matrix``, ``spiral_matrix``, ``string_insertion``) or ``sympy.parse_expr`` (which evaluates Python:
#: ``simple_integration``, ``intermediate_integration``, ``polynomial_multiplication``) in reasoning-gym 0.1.25.
#: A population optimizer would search that surface, so esx refuses them (``countdown`` and ``puzzle24`` are
#: scored by esx's own Countdown parser instead of their ``eval``-based checkers).
UNSAFE_REASONING_GYM = frozenset({"n_queens", "binary_matrix", "spiral_matrix", "string_insertion",
                                  "simple_integration", "intermediate_integration", "polynomial_multiplication"})


@dataclasses.dataclass(frozen=True)
class ReasoningGym:
    """Problems from a `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ generator, scored by that
    dataset's own verifier under esx's answer rules (optional: ``pip install reasoning-gym``, the
    ``llm-reasoning-gym`` extra).

    ``dataset`` is a reasoning-gym name (``"basic_arithmetic"``, ``"chain_sum"``, ``"countdown"``, ...) and
    ``options`` its keyword options as ``(key, value)`` pairs (a tuple, so the task stays hashable). The answer is
    the answer section (``strict=False``: the completion's last non-empty line when it has no answer tag at all;
    malformed tags score ``0.0``), judged by :func:`score_reasoning_gym_answer`: no invisible characters, ASCII when
    the reference is, Countdown rules for ``countdown``/``puzzle24``, one well-formed number for a numeric
    reference, and ``1.0`` only for the verifier's full credit (``0.0`` also when it raises).
    """

    dataset: str = "basic_arithmetic"
    options: tuple = ()
    strict: bool = True
    name: str = "reasoning_gym"

    def __post_init__(self):
        if self.dataset in UNSAFE_REASONING_GYM:
            raise ValueError(f"reasoning-gym dataset {self.dataset!r} is refused: its verifier evaluates the model's "
                             "answer as code (eval / sympy.parse_expr), which a population optimizer would exploit; "
                             f"refused datasets: {sorted(UNSAFE_REASONING_GYM)}")
        import reasoning_gym  # noqa: F401 - a clear ImportError here rather than at the first sample

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        import reasoning_gym

        data = reasoning_gym.create_dataset(self.dataset, size=n, seed=rng.randrange(2**31), **dict(self.options))
        return [Problem(question=e["question"], answer=e["answer"], meta={"entry": e}) for e in data]

    def score(self, problem: Problem, completion: str) -> float:
        import reasoning_gym

        kind, answer = _answer_section(completion)
        if kind == _ABSENT and not self.strict:
            lines = [x.strip(_ASCII_WS) for x in completion.split("\n")]
            lines = [x for x in lines if x]
            answer = lines[-1] if lines else None
        elif kind != _OK:
            return 0.0
        entry = problem.meta["entry"]
        try:
            verify = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
        except Exception:  # noqa: BLE001 - an entry without a known dataset cannot be scored
            return 0.0
        return score_reasoning_gym_answer(answer, entry, verify)


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
    """GSM8K-style word problems from a list of problems (:func:`load_gsm8k`); correct when the answer section holds
    exactly one well-formed ASCII number, equal to the reference (words around it allowed: ``10 apples``); with
    ``strict=False`` the last number of a completion without any answer tag (:func:`final_number`)."""

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
