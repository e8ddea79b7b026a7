"""Red-team tests of the verifiers (issue #23, item 2: verifiers that cannot be gamed).

One family per task (Arithmetic and GSM8K, their lenient mode, Countdown, the reasoning-gym adapter). Every family
has hypothesis generators of wrong-but-sneaky answers that must score exactly ``0.0`` (suffix and prefix tricks,
several numbers, an equation with a wrong side, Unicode digits and look-alikes, nested or repeated answer tags, huge
and tiny numbers, operator-precedence tricks, whitespace and zero-width characters) and generators of correct answers
in every accepted format that must score exactly ``1.0``. The rules under test are the module docstring of
``esx_envs/llm/tasks.py`` and "What each verifier accepts" in ``docs/llm.md``.
"""
from __future__ import annotations

import random
from decimal import Decimal
from fractions import Fraction

import pytest

from esx_envs.llm import tasks

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings, strategies as st  # noqa: E402

SETTINGS = settings(max_examples=120, deadline=None)

ARITH, ARITH_LENIENT = tasks.Arithmetic(), tasks.Arithmetic(strict=False)
GSM, GSM_LENIENT = tasks.GSM8K(), tasks.GSM8K(strict=False)
NUMERIC_TASKS = (ARITH, ARITH_LENIENT, GSM, GSM_LENIENT)
COUNTDOWN = tasks.Countdown()


def numeric_scores(target: int, completion: str) -> list[float]:
    problem = tasks.Problem("q", target)
    return [task.score(problem, completion) for task in NUMERIC_TASKS]


def countdown_score(numbers, target: int, answer: str) -> float:
    return COUNTDOWN.score(tasks.Problem("q", target, {"numbers": tuple(numbers)}), f"<answer>{answer}</answer>")


# ----------------------------------------------------------------------------------------------------------------
# The examples of the issue
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["1000000000000000000000000000000072", "7,2", "٧٢", "７２"])
def test_issue_examples_numeric(answer):
    assert numeric_scores(72, f"<answer>{answer}</answer>") == [0.0] * 4
    # lenient mode without tags reads the last number whole and requires it to be well-formed ASCII
    assert ARITH_LENIENT.score(tasks.Problem("What is 40 + 32?", 72), f"40 + 32 is {answer}") == 0.0
    assert GSM_LENIENT.score(tasks.Problem("What is 40 + 32?", 72), f"so {answer}") == 0.0


def test_issue_examples_numeric_correct():
    assert numeric_scores(72, "<answer>72</answer>") == [1.0] * 4
    assert ARITH_LENIENT.score(tasks.Problem("What is 40 + 32?", 72), "40 + 32 is 72.") == 1.0


def test_issue_examples_countdown():
    assert countdown_score((3, 8, 1), 24, "3*8*1 = 25") == 0.0
    assert countdown_score((3, 8, 1), 24, "24 = 3*8*1") == 1.0
    assert countdown_score((3, 8, 1), 24, "3*8*1 = 24") == 1.0
    assert countdown_score((3, 8, 1), 24, "3*8*1") == 1.0
    assert not COUNTDOWN.check("3*8*1 = 25", (3, 8, 1), 24)
    assert COUNTDOWN.check("24 = 3*8*1", (3, 8, 1), 24)


def test_parse_number_reads_whole_numbers():
    assert tasks.parse_number("1000000000000000000000000000000072") == 10**33 + 72
    assert tasks.parse_number("x " + "9" * 5000) is None  # over MAX_NUMBER_CHARS: malformed, not split
    assert tasks.parse_number("7,2") is None and tasks.parse_number("٧٢") is None
    assert tasks.parse_number("it is 1,234.5.") == Fraction(12345, 10)
    assert tasks.parse_single_number("10 apples") == 10 and tasks.parse_single_number("1 or 2") is None


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------
TARGETS = st.integers(min_value=-10**7, max_value=10**7)
BLANKS = st.text(alphabet=" \t\n", max_size=3)
# reasoning before the answer section: anything but tags (and no surrogates)
THINK = st.text(alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=40)
# reasoning for lenient (tag-free) completions whose last number must be the sneaky one: no digits of any script
PLAIN_THINK = st.text(
    alphabet=st.characters(blacklist_characters="<>+-", blacklist_categories=("Cs", "Nd", "No", "Nl")), max_size=40)
UNICODE_ZEROS = [0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xE50, 0x1040, 0xFF10, 0x1D7CE, 0x1D7D8, 0x1D7EC]
LOOKALIKES = {"0": "OoОоΟ〇", "1": "lIi|ǀ", "2": "Zz", "3": "ЗзƷ", "4": "Ꮞ", "5": "Ss", "6": "бG", "7": "T",
              "8": "B", "9": "gq"}
SUPERSCRIPTS = dict(zip("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\u202e", "\u034f"]
UNICODE_SPACES = ["\u00a0", "\u2009", "\u202f", "\u3000", "\u2002", "\u1680"]
MINUS_LOOKALIKES = ["\u2212", "\u2010", "\u2013", "\u2014", "\ufe63", "\uff0d"]


def digits(min_size=1, max_size=40):
    return st.text(alphabet="0123456789", min_size=min_size, max_size=max_size)


@st.composite
def accepted_number(draw, n: int) -> str:
    """``n`` in one of the accepted spellings."""
    forms = [str(n), f"{n}.{'0' * draw(st.integers(1, 4))}"]
    if abs(n) >= 1000:
        forms.append(f"{n:,}")
        forms.append(f"{n:,}.0")
    if n >= 0:
        forms.append(f"+{n}")
    return draw(st.sampled_from(forms))


@st.composite
def accepted_section(draw, n: int) -> str:
    """An answer section for ``n`` in every accepted format: the number alone or with words around it."""
    x = draw(accepted_number(n))
    frame = draw(st.sampled_from(["{x}", "The answer is {x}.", "{x} apples", "= {x}", "({x})", "x = {x}",
                                  "It is {x}!", "{x}%", "answer: {x}, done", "[{x}]", "${x}"]))
    return draw(BLANKS) + frame.format(x=x) + draw(BLANKS)


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic and GSM8K: sneaky answer sections
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def suffix_prefix_tricks(draw, n: int) -> str:
    kind = draw(st.sampled_from(["digit_prefix", "digit_suffix", "letter_prefix", "letter_suffix", "zero_pad"]))
    sign = "-" if n < 0 else ""
    if kind == "digit_prefix":  # 1000…0072: the old verifier read only the last 31 characters
        return f"{sign}{draw(st.sampled_from('123456789'))}{draw(digits(0, 60))}{abs(n)}"
    if kind == "digit_suffix":
        return f"{n}{draw(digits())}"
    if kind == "zero_pad":
        return f"{sign}{'0' * draw(st.integers(1, 5))}{abs(n)}"
    glue = draw(st.text(alphabet="abcdefxXeEn_", min_size=1, max_size=4))
    return f"{glue}{n}" if kind == "letter_prefix" else f"{n}{glue}"


@st.composite
def several_numbers(draw, n: int) -> str:
    other = draw(st.one_of(st.just(n), TARGETS, st.integers(-5, 5).map(lambda d: n + d)))
    sep = draw(st.sampled_from([" ", " or ", ", ", "/", " = ", "\n", " and ", "; ", "-", " + ", " * ", " | "]))
    parts = [str(n), str(other)]
    if draw(st.booleans()):
        parts.reverse()
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, 2)), str(draw(TARGETS)))
    return sep.join(parts)


@st.composite
def expression_instead_of_number(draw, n: int) -> str:
    """Operator-precedence and expression tricks: an expression (often one equal to ``n``) is not a number."""
    a = draw(st.integers(0, 10**6))
    b = n - a
    forms = [f"{a} + {b}" if b >= 0 else f"{a} - {-b}", f"{n} + 0", f"{n} * 1", f"{2 * n} / 2", f"{n}/1",
             f"{a} + {b} = {n}", f"{n} = {n}", f"({n})({1})", f"2 * 3 + {n - 6}"]
    return draw(st.sampled_from(forms))


@st.composite
def misgrouped_commas(draw, n: int) -> str:
    s = str(abs(n))
    assume(len(s) >= 2)
    cuts = draw(st.sets(st.integers(1, len(s) - 1), min_size=1))
    text = "".join(c + ("," if i + 1 in cuts else "") for i, c in enumerate(s))
    assume(text != f"{abs(n):,}")
    kind = draw(st.sampled_from(["inside", "leading", "double", "decimal_comma"]))
    if kind == "leading":
        text = "," + s
    elif kind == "double":
        text = s[:1] + ",," + s[1:]
    elif kind == "decimal_comma":
        text = s + "," + draw(digits(1, 2))
    return ("-" if n < 0 else "") + text


@st.composite
def unicode_digits(draw, n: int) -> str:
    s = str(n)
    positions = [i for i, c in enumerate(s) if c.isdigit()]
    chosen = draw(st.sets(st.sampled_from(positions), min_size=1))
    kind = draw(st.sampled_from(["script", "lookalike", "superscript"]))
    out = list(s)
    for i in chosen:
        if kind == "script":
            out[i] = chr(draw(st.sampled_from(UNICODE_ZEROS)) + int(s[i]))
        elif kind == "lookalike":
            out[i] = draw(st.sampled_from(LOOKALIKES[s[i]]))
        else:
            out[i] = SUPERSCRIPTS[s[i]]
    text = "".join(out)
    if draw(st.booleans()):  # a look-alike minus sign (or fullwidth plus) in front
        text = draw(st.sampled_from(MINUS_LOOKALIKES + ["\uff0b"])) + str(abs(n))
    return text


@st.composite
def whitespace_and_invisible(draw, n: int) -> str:
    s = str(n)
    kind = draw(st.sampled_from(["invisible", "unicode_space", "inner_space", "control"]))
    if kind == "inner_space":  # ASCII whitespace inside the digits: two numbers (or a detached sign)
        assume(len(s) >= 2)
        i = draw(st.integers(1, len(s) - 1))
        return s[:i] + draw(st.sampled_from([" ", "\t", "\n", "  "])) + s[i:]
    char = draw(st.sampled_from(INVISIBLE if kind == "invisible" else UNICODE_SPACES if kind == "unicode_space"
                                else ["\x00", "\x07", "\x1b", "\x7f", "\x85"]))
    i = draw(st.integers(0, len(s)))
    return s[:i] + char + s[i:]


@st.composite
def huge_and_tiny(draw, n: int) -> str:
    k = draw(st.integers(1, 40))
    forms = [f"{n}.{'0' * k}1",  # n plus a tiny amount (a float would round it to n)
             f"0.{'0' * k}{abs(n) or 1}", f"{n}e0", f"{n}E+00", f"{n}.0e0", "9" * draw(st.integers(600, 5000)),
             f"{n}{'0' * k}", f"{n}{'0' * k}.0"]
    if n > 0:
        forms.append(f"{n - 1}.{'9' * k}")
    if n != 0:
        mantissa = f"{str(abs(n))[0]}.{str(abs(n))[1:] or '0'}"
        forms.append(("-" if n < 0 else "") + f"{mantissa}e{len(str(abs(n))) - 1}")
    text = draw(st.sampled_from(forms))
    assume(text != str(n))
    return text


@st.composite
def sign_tricks(draw, n: int) -> str:
    forms = [f"--{n}", f"+-{n}", f"-+{n}", f"- {abs(n)}" if n < 0 else f"+ {n}", f"-({n})", f"(-{n})", f"x-{n}",
             f"-{n}".replace("--", "")]
    text = draw(st.sampled_from(forms))
    assume(n != 0 or text not in ("-0", "(-0)", "-(0)", "--0"))
    return text


NUMERIC_FAMILIES = {
    "suffix_prefix": suffix_prefix_tricks, "several_numbers": several_numbers,
    "expression": expression_instead_of_number, "misgrouped_commas": misgrouped_commas,
    "unicode_digits": unicode_digits, "whitespace_invisible": whitespace_and_invisible,
    "huge_tiny": huge_and_tiny, "signs": sign_tricks,
}


@SETTINGS
@given(n=TARGETS, think=THINK, data=st.data())
def test_numeric_accepts_every_accepted_format(n, think, data):
    section = data.draw(accepted_section(n))
    prefix = data.draw(st.sampled_from(["", f"{think}</think>", f"<think>{think}</think>\n"]))
    assert numeric_scores(n, f"{prefix}<answer>{section}</answer>") == [1.0] * 4


@pytest.mark.parametrize("family", sorted(NUMERIC_FAMILIES))
@SETTINGS
@given(n=TARGETS, think=THINK, data=st.data())
def test_numeric_rejects_sneaky_answer_sections(family, n, think, data):
    section = data.draw(NUMERIC_FAMILIES[family](n))
    completion = f"{think}</think><answer>{data.draw(BLANKS)}{section}{data.draw(BLANKS)}</answer>"
    assert numeric_scores(n, completion) == [0.0] * 4, (family, section)


@st.composite
def malformed_tags(draw, right: str, wrong: str) -> str:
    forms = [
        f"<answer>{wrong}</answer><answer>{right}</answer>", f"<answer>{right}</answer><answer>{right}</answer>",
        f"<answer><answer>{right}</answer>", f"<answer>{right}</answer></answer>",
        f"<answer>{wrong}<answer>{right}</answer></answer>", f"<answer>{right}", f"{right}</answer>",
        f"</answer>{right}<answer>", f"<think>I will write <answer> at the end</think><answer>{right}</answer>",
        f"<answer>{right}</answer> and again <answer>{right}</answer>", f"<answer>{right}<answer>",
        f"<answer>{right}</answer><answer></answer>", "<answer>" + " " * 600 + f"{right}</answer>",
    ]
    return draw(st.sampled_from(forms))


@SETTINGS
@given(n=TARGETS, wrong=TARGETS, think=THINK, data=st.data())
def test_numeric_rejects_repeated_and_nested_tags(n, wrong, think, data):
    completion = think + data.draw(malformed_tags(str(n), str(wrong)))
    assert numeric_scores(n, completion) == [0.0] * 4, completion  # lenient mode included


# ----------------------------------------------------------------------------------------------------------------
# Lenient mode (no answer tag): the completion's last number
# ----------------------------------------------------------------------------------------------------------------
@SETTINGS
@given(n=TARGETS, think=THINK, data=st.data())
def test_lenient_accepts_last_number_in_every_accepted_format(n, think, data):
    x = data.draw(accepted_number(n))
    tail = data.draw(st.sampled_from(["{x}", "So the answer is {x}.", "= {x}", "{x} apples", "({x})", "{x}!",
                                      "answer: {x}\n", "**{x}**"])).format(x=x)
    completion = f"{think}\n{tail}"
    assert ARITH_LENIENT.score(tasks.Problem("q", n), completion) == 1.0
    assert GSM_LENIENT.score(tasks.Problem("q", n), completion) == 1.0
    assert ARITH.score(tasks.Problem("q", n), completion) == 0.0  # strict: no answer section


LENIENT_FAMILIES = {  # families whose last number is itself wrong or malformed
    "suffix_prefix": suffix_prefix_tricks, "misgrouped_commas": misgrouped_commas, "unicode_digits": unicode_digits,
    "huge_tiny": huge_and_tiny,
}


@st.composite
def glued_invisible(draw, n: int) -> str:
    """An invisible or non-ASCII space character inside or right next to the digits."""
    s = str(n)
    char = draw(st.sampled_from(INVISIBLE + UNICODE_SPACES))
    i = draw(st.sampled_from([j for j in range(len(s) + 1) if not (j == 1 and s[0] == "-")]))
    return s[:i] + char + s[i:]


@st.composite
def lenient_sign_tricks(draw, n: int) -> str:
    return draw(st.sampled_from([f"--{n}", f"+-{n}", f"- {abs(n)}" if n < 0 else f"+ {n}",
                                 f"-{n}" if n > 0 else f"x{n}"]))


LENIENT_FAMILIES.update(glued_invisible=glued_invisible, signs=lenient_sign_tricks)


@pytest.mark.parametrize("family", sorted(LENIENT_FAMILIES))
@SETTINGS
@given(n=TARGETS, think=PLAIN_THINK, data=st.data())
def test_lenient_rejects_sneaky_last_numbers(family, n, think, data):
    sneaky = data.draw(LENIENT_FAMILIES[family](n))
    completion = f"{think}\nSo the answer is {sneaky}"
    assert ARITH_LENIENT.score(tasks.Problem("q", n), completion) == 0.0, (family, sneaky)
    assert GSM_LENIENT.score(tasks.Problem("q", n), completion) == 0.0, (family, sneaky)


# ----------------------------------------------------------------------------------------------------------------
# Countdown
# ----------------------------------------------------------------------------------------------------------------
PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


@st.composite
def trees(draw, leaves):
    """A random binary expression tree over ``leaves`` (in this order): an int or ``(op, left, right)``. Every
    subtree's value is a positive integer (a ``-`` or ``/`` that would break this becomes ``+`` or ``*``)."""
    if len(leaves) == 1:
        return leaves[0]
    cut = draw(st.integers(1, len(leaves) - 1))
    left, right = draw(trees(leaves[:cut])), draw(trees(leaves[cut:]))
    a, b = value(left), value(right)
    op = draw(st.sampled_from("+-*/"))
    if op == "-" and a - b <= 0:
        op = "+"
    if op == "/" and (a / b).denominator != 1:
        op = "*"
    return (op, left, right)


def value(tree) -> Fraction:
    if isinstance(tree, int):
        return Fraction(tree)
    op, a, b = tree
    a, b = value(a), value(b)
    if op == "/" and b == 0:
        raise ZeroDivisionError
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]


def render(tree, sp: str = " ", minimal: bool = True, leaf=str) -> str:
    """Infix text; ``minimal``: parentheses only where precedence needs them, else around every operation."""
    if isinstance(tree, int):
        return leaf(tree)
    op, a, b = tree

    def child(t, right):
        text = render(t, sp, minimal, leaf)
        if isinstance(t, int):
            return text
        if not minimal or PREC[t[0]] < PREC[op] or (right and PREC[t[0]] == PREC[op] and op in "-/"):
            return f"({text})"
        return text

    return f"{child(a, False)}{sp}{op}{sp}{child(b, True)}"


def flat(tree) -> str:
    """The tree with every parenthesis dropped (what a precedence-blind writer produces)."""
    if isinstance(tree, int):
        return str(tree)
    return f"{flat(tree[1])} {tree[0]} {flat(tree[2])}"


def leaves_of(tree) -> list:
    return [tree] if isinstance(tree, int) else leaves_of(tree[1]) + leaves_of(tree[2])


def safe_value(tree):
    try:
        return value(tree)
    except ZeroDivisionError:
        return None


def is_target(v) -> bool:
    return v is not None and v.denominator == 1 and v > 0


@st.composite
def countdown_problems(draw):
    numbers = draw(st.lists(st.integers(1, 30), min_size=2, max_size=5))
    tree = draw(trees(draw(st.permutations(numbers))))
    return numbers, tree, int(value(tree))


@SETTINGS
@given(problem=countdown_problems(), data=st.data())
def test_countdown_accepts_every_accepted_format(problem, data):
    numbers, tree, target = problem
    expr = render(tree, data.draw(st.sampled_from(["", " ", "  "])), minimal=data.draw(st.booleans()))
    form = data.draw(st.sampled_from(["{e}", "{e} = {t}", "{t} = {e}", "({e})", "{e}={t}", "{t}={e}"]))
    answer = data.draw(BLANKS) + form.format(e=expr, t=target) + data.draw(BLANKS)
    assert countdown_score(numbers, target, answer) == 1.0, answer
    assert tasks.Countdown(use_all=False).check(answer, numbers, target)


@st.composite
def cd_wrong_side(draw, numbers, tree, target):
    e = render(tree)
    wrong = draw(st.integers(0, 10**6).filter(lambda w: w != target))
    a = draw(st.integers(1, 9))
    forms = [f"{e} = {wrong}", f"{wrong} = {e}", f"{e} = {target} = {target}", f"{e} == {target}", f"{e} = {e}",
             f"{e} = {target}.0", f"{e} = 0{target}", f"{e} = +{target}", f"{e} = ({target})", f"{e} = {target} + 0",
             f"{e} = {target * a} / {a}", f"{e} =", f"= {e}", f"{e} = {target}{draw(digits(1, 3))}",
             f"{target} = {target}", f"{e} = -{target}", f"{e} = {target}, {wrong}", f"{e} = {wrong} = {target}"]
    return draw(st.sampled_from(forms))


PRECEDENCE_PATTERNS = [  # trees whose parentheses matter; dropping them changes the value
    lambda a, b, c: ("*", ("+", a, b), c), lambda a, b, c: ("*", a, ("+", b, c)),
    lambda a, b, c: ("*", ("-", a, b), c), lambda a, b, c: ("-", a, ("-", b, c)),
    lambda a, b, c: ("-", a, ("+", b, c)), lambda a, b, c: ("/", a, ("*", b, c)),
    lambda a, b, c: ("/", ("+", a, b), c), lambda a, b, c: ("/", a, ("/", b, c)),
    lambda a, b, c: ("/", ("-", a, b), c), lambda a, b, c: ("*", c, ("-", a, b)),
]


@st.composite
def cd_precedence(draw, numbers, tree, target):
    """The right numbers, but precedence makes the written expression something else. Returns
    ``(numbers, target, answer)``: the trick needs a tree whose parentheses matter."""
    a, b, c = (draw(st.integers(1, 30)) for _ in range(3))
    tricky = draw(st.sampled_from(PRECEDENCE_PATTERNS))(a, b, c)
    if not is_target(safe_value(tricky)):  # fall back to (a + b) * c, written a + b * c
        tricky = ("*", ("+", a, b), max(c, 2))
    if draw(st.booleans()):  # inside a larger expression
        tricky = (draw(st.sampled_from("+*")), tricky, draw(st.integers(1, 30)))
    v = value(tricky)
    text = flat(tricky)  # every parenthesis dropped
    assume(tasks.parse_expression(text) != v)
    return leaves_of(tricky), int(v), text


@st.composite
def cd_number_misuse(draw, numbers, tree, target):
    kind = draw(st.sampled_from(["duplicate", "omit", "extra", "target", "leading_zero", "decimal", "split"]))
    e = render(tree)
    leaves = leaves_of(tree)
    if kind == "duplicate":  # one given number replaced by another given number; the target follows the new value
        i, j = draw(st.integers(0, len(leaves) - 1)), draw(st.integers(0, len(leaves) - 1))
        assume(leaves[i] != leaves[j])
        counter = iter(range(len(leaves)))
        new = render(tree, leaf=lambda x: str(leaves[j]) if next(counter) == i else str(x))
        return new, tasks.parse_expression(new)
    if kind == "omit":  # one side of the root only: fewer numbers than given
        side = tree[draw(st.integers(1, 2))]
        return render(side), safe_value(side)
    if kind == "extra":
        return draw(st.sampled_from([f"{e} + 0", f"{e} - 0", f"({e}) * 1", f"({e}) / 1", f"({e}) * 7 / 7"])), target
    if kind == "target":
        return draw(st.sampled_from([f"{target}", f"{target} * 1", f"{target} + 0", f"({target})"])), target
    if kind == "leading_zero":
        return render(tree, leaf=lambda x: f"0{x}"), target
    if kind == "decimal":
        return render(tree, leaf=lambda x: f"{x}.0"), target
    # split: a given number written as a combination of digits that are not given
    big = [x for x in leaves if x >= 10]
    assume(big)
    x = big[0]
    done = []
    return render(tree, leaf=lambda y: f"({y // 10} * 10 + {y % 10})" if y == x and not done.append(1) and
                  len(done) == 1 else str(y)), target


@st.composite
def cd_unicode(draw, numbers, tree, target):
    e = render(tree)
    kind = draw(st.sampled_from(["digit", "operator", "invisible", "space", "paren"]))
    if kind == "digit":
        positions = [i for i, c in enumerate(e) if c.isdigit()]
        i = draw(st.sampled_from(positions))
        repl = draw(st.one_of(st.sampled_from(UNICODE_ZEROS).map(lambda z: chr(z + int(e[i]))),
                              st.just(SUPERSCRIPTS[e[i]]), st.sampled_from(LOOKALIKES[e[i]])))
        return e[:i] + repl + e[i + 1:]
    if kind == "operator":
        ops = [i for i, c in enumerate(e) if c in "+-*/"]
        i = draw(st.sampled_from(ops))
        repl = {"+": "➕＋", "-": "".join(MINUS_LOOKALIKES), "*": "×∗·xX⋅", "/": "÷∕⁄:"}[e[i]]
        return e[:i] + draw(st.sampled_from(repl)) + e[i + 1:]
    if kind == "paren":
        return "（" + e + "）"
    char = draw(st.sampled_from(INVISIBLE if kind == "invisible" else UNICODE_SPACES))
    i = draw(st.integers(0, len(e)))
    return e[:i] + char + e[i:]


@st.composite
def cd_unary_and_operators(draw, numbers, tree, target):
    e = render(tree)
    return draw(st.sampled_from([f"-(-({e}))", f"- -({e})", f"+({e})", f"--({e})", f"({e}) ** 1", f"({e}) ^ 1",
                                 f"({e}) // 1", f"({e}) % {target + 1}", f"({e})(1)", f"({e})" * 2,
                                 f"({e}) * 1e0", f"({e}) + 0.{'0' * draw(st.integers(1, 30))}1",
                                 f"({e}) * 1{'0' * 12} / 1{'0' * 12}", f"{e};", f"{e} + ", f"[{e}]"]))


@st.composite
def cd_tags(draw, numbers, tree, target):
    e = render(tree)
    wrong = draw(st.integers(0, 99))
    return draw(malformed_tags(e, str(wrong)))


COUNTDOWN_FAMILIES = {"wrong_side": cd_wrong_side, "unicode": cd_unicode,
                      "unary_and_operators": cd_unary_and_operators}


@pytest.mark.parametrize("family", sorted(COUNTDOWN_FAMILIES))
@SETTINGS
@given(problem=countdown_problems(), data=st.data())
def test_countdown_rejects_sneaky_answers(family, problem, data):
    numbers, tree, target = problem
    answer = data.draw(COUNTDOWN_FAMILIES[family](numbers, tree, target))
    assert countdown_score(numbers, target, answer) == 0.0, answer


@SETTINGS
@given(data=st.data())
def test_countdown_rejects_precedence_tricks(data):
    numbers, target, answer = data.draw(cd_precedence(None, None, None))
    assert countdown_score(numbers, target, answer) == 0.0, answer
    assert countdown_score(numbers, target, f"{answer} = {target}") == 0.0, answer


@SETTINGS
@given(problem=countdown_problems(), data=st.data())
def test_countdown_rejects_misused_numbers(problem, data):
    numbers, tree, target = problem
    answer, aimed_at = data.draw(cd_number_misuse(numbers, tree, target))
    assume(is_target(aimed_at))  # the answer evaluates to the target it is scored against
    parsed = tasks.parse_expression(answer, return_numbers=True)
    assume(parsed is None or sorted(parsed[1]) != sorted(numbers))  # "1 * 1" for (1, 1) is no misuse
    assert countdown_score(numbers, int(aimed_at), answer) == 0.0, answer


@SETTINGS
@given(problem=countdown_problems(), think=THINK, data=st.data())
def test_countdown_rejects_repeated_and_nested_tags(problem, think, data):
    numbers, tree, target = problem
    completion = think + data.draw(cd_tags(numbers, tree, target))
    assert COUNTDOWN.score(tasks.Problem("q", target, {"numbers": tuple(numbers)}), completion) == 0.0, completion


# ----------------------------------------------------------------------------------------------------------------
# reasoning-gym adapter: esx's rules around the dataset verifier
# ----------------------------------------------------------------------------------------------------------------
def rg_default_verifier(answer, entry):
    """reasoning-gym's default ``score_answer``: exact match, else partial credit when the answer contains it."""
    oracle = entry["answer"]
    if answer == oracle:
        return 1.0
    return len(oracle) / len(answer) if oracle in answer else 0.0


def rg_decimal_verifier(answer, entry):
    """reasoning-gym's ``compute_decimal_reward`` (chain_sum, ...): commas stripped, ``Decimal`` (which reads
    non-ASCII digits), partial credit."""
    a, o = answer.replace(",", ""), entry["answer"].replace(",", "")
    try:
        if Decimal(a) == Decimal(o):
            return 1.0
    except Exception:  # noqa: BLE001
        pass
    return len(o) / len(a) if o in a else 0.0


def rg_permissive_verifier(answer, entry):
    return 1.0


def rg_numeric_entry(n: int) -> dict:
    return {"question": "q", "answer": str(n), "metadata": {"source_dataset": "basic_arithmetic"}}


@SETTINGS
@given(n=TARGETS, data=st.data())
def test_rg_numeric_reference_accepts_every_accepted_format(n, data):
    section = data.draw(accepted_section(n)).strip()
    for verify in (rg_default_verifier, rg_decimal_verifier):
        assert tasks.score_reasoning_gym_answer(section, rg_numeric_entry(n), verify) == 1.0, section


@pytest.mark.parametrize("family", sorted(NUMERIC_FAMILIES))
@SETTINGS
@given(n=TARGETS, data=st.data())
def test_rg_numeric_reference_rejects_sneaky_answers(family, n, data):
    answer = data.draw(NUMERIC_FAMILIES[family](n))
    for verify in (rg_default_verifier, rg_decimal_verifier):
        assert tasks.score_reasoning_gym_answer(answer, rg_numeric_entry(n), verify) == 0.0, (family, answer)


@SETTINGS
@given(word=st.text(alphabet="abcdefghij ,", min_size=1, max_size=12).map(str.strip).filter(bool), data=st.data())
def test_rg_text_reference_rules(word, data):
    entry = {"question": "q", "answer": word, "metadata": {"source_dataset": "some_dataset"}}
    assert tasks.score_reasoning_gym_answer(word, entry, rg_default_verifier) == 1.0
    i = data.draw(st.integers(0, len(word)))
    sneaky = data.draw(st.sampled_from([
        word[:i] + data.draw(st.sampled_from(INVISIBLE)) + word[i:],  # zero-width character
        # Cyrillic look-alike letters (or, for a word without a, e, c, a zero-width space)
        word.replace("a", "а").replace("e", "е").replace("c", "с") + ("" if set("aec") & set(word) else "\u200b"),
        "x" + word, word + " " + word,  # partial credit only: the reference is inside a longer (wrong) answer
        word + "\x00",
    ]))
    assert tasks.score_reasoning_gym_answer(sneaky, entry, rg_default_verifier) == 0.0, sneaky


def rg_countdown_entry(numbers, target, source="countdown"):
    meta = {"source_dataset": source, "numbers": list(numbers)}
    if source == "countdown":
        meta["target"] = target
    return {"question": "q", "answer": "", "metadata": meta}


@SETTINGS
@given(problem=countdown_problems(), data=st.data())
def test_rg_countdown_uses_esx_rules(problem, data):
    numbers, tree, target = problem
    entry = rg_countdown_entry(numbers, target)
    good = data.draw(st.sampled_from(["{e}", "{e} = {t}", "{t} = {e}", "-(-({e}))"])).format(e=render(tree), t=target)
    assert tasks.score_reasoning_gym_answer(good, entry, rg_permissive_verifier) == 1.0  # unary minus allowed here
    family = data.draw(st.sampled_from(["wrong_side", "unicode"]))
    bad = data.draw(COUNTDOWN_FAMILIES[family](numbers, tree, target))
    # the verifier is never asked: a permissive one does not rescue a wrong answer
    assert tasks.score_reasoning_gym_answer(bad, entry, rg_permissive_verifier) == 0.0, bad
    p_numbers, p_target, p_answer = data.draw(cd_precedence(None, None, None))
    entry = rg_countdown_entry(p_numbers, p_target)
    assert tasks.score_reasoning_gym_answer(p_answer, entry, rg_permissive_verifier) == 0.0, p_answer


def test_countdown_exact_rational_arithmetic():
    assert countdown_score((8, 3, 3), 8, "8 / 3 * 3") == 1.0  # exact: no float rounding
    assert countdown_score((1, 3, 3), 1, "1 / 3 * 3") == 1.0
    assert countdown_score((2, 3, 4), 1, "2 / 3 * 4") == 0.0  # 8/3, not an integer
    assert countdown_score((3, 8, 1), 24, "3 * 8 / 1 = 24") == 1.0


def test_rg_puzzle24_checks_the_given_numbers():
    entry = rg_countdown_entry([8, 5, 10, 6], 24, source="puzzle24")
    assert tasks.score_reasoning_gym_answer("10*(8 - 5) - 6", entry, rg_permissive_verifier) == 1.0
    assert tasks.score_reasoning_gym_answer("6*4*1*1", entry, rg_permissive_verifier) == 0.0  # wrong numbers
    assert tasks.score_reasoning_gym_answer("__import__('os')", entry, rg_permissive_verifier) == 0.0


# The adapter end to end with the real reasoning-gym datasets (skipped without the optional extra).
_RG_CACHE: dict = {}


def rg_problems(dataset: str):
    if dataset not in _RG_CACHE:
        task = tasks.ReasoningGym(dataset, strict=False)
        _RG_CACHE[dataset] = (task, task.sample(random.Random(0), 16))
    return _RG_CACHE[dataset]


@pytest.fixture(scope="module")
def reasoning_gym():
    return pytest.importorskip("reasoning_gym")


def test_rg_issue_examples(reasoning_gym):
    task, problems = rg_problems("basic_arithmetic")
    p = tasks.Problem("What is 40 + 32?", "72", {"entry": {**problems[0].meta["entry"], "answer": "72"}})
    for answer in ["1000000000000000000000000000000072", "7,2", "٧٢", "７２", "72 73", "<answer>72"]:
        assert task.score(p, f"<answer>{answer}</answer>") == 0.0, answer
    for answer in ["72", " 72 ", "72.0", "+72"]:
        assert task.score(p, f"<answer>{answer}</answer>") == 1.0, answer


@pytest.mark.parametrize("dataset", ["basic_arithmetic", "chain_sum", "countdown", "puzzle24"])
def test_rg_reference_answers_score_one(reasoning_gym, dataset):
    task, problems = rg_problems(dataset)
    for p in problems:
        assert task.score(p, f"<think>ok</think><answer>{p.answer}</answer>") == 1.0, p.answer
        assert task.score(p, f"<answer>{p.answer}</answer><answer>{p.answer}</answer>") == 0.0
        assert task.score(p, f"<answer><answer>{p.answer}</answer>") == 0.0


@pytest.mark.parametrize("family", sorted(NUMERIC_FAMILIES))
@settings(max_examples=30, deadline=None)
@given(index=st.integers(0, 15), data=st.data())
def test_rg_real_numeric_datasets_reject_sneaky_answers(reasoning_gym, family, index, data):
    for dataset in ("basic_arithmetic", "chain_sum"):
        task, problems = rg_problems(dataset)
        p = problems[index]
        answer = data.draw(NUMERIC_FAMILIES[family](int(p.answer)))
        assert task.score(p, f"<answer>{answer}</answer>") == 0.0, (dataset, answer)
        if family in LENIENT_FAMILIES:  # lenient: the last line
            assert task.score(p, f"thinking\n{answer}") == 0.0, (dataset, answer)


def test_reasoning_gym_datasets_whose_verifier_evaluates_code_are_refused():
    """n_queens & co. run the answer through eval / sympy.parse_expr: refused at the task and at the config."""
    from esx.run import ConfigError
    from esx_envs.llm.config import LLMConfig

    for name in sorted(tasks.UNSAFE_REASONING_GYM):
        with pytest.raises(ValueError, match="evaluates the model's answer as code"):
            tasks.get_task(f"rg:{name}")
        with pytest.raises(ConfigError, match="evaluates the model's"):
            LLMConfig(task=f"rg:{name}")
    assert "countdown" not in tasks.UNSAFE_REASONING_GYM and "basic_arithmetic" not in tasks.UNSAFE_REASONING_GYM


LENIENT_COUNTDOWN = tasks.Countdown(strict=False)
PROSE = st.sampled_from(["", "Let me try. ", "We need the target.\n", "Step 1: add.\nStep 2: check.\n"])
ENDINGS = st.sampled_from(["", ".", " .", "!", "\n", ". Done."])


def lenient_score(numbers, target, completion):
    return LENIENT_COUNTDOWN.score(tasks.Problem("q", target, {"numbers": tuple(numbers)}), completion)


@SETTINGS
@given(problem=countdown_problems(), prose=PROSE, ending=ENDINGS, data=st.data())
def test_lenient_countdown_reads_the_last_equation_of_untagged_prose(problem, prose, ending, data):
    """Lenient mode (``Countdown(strict=False)``, what ``llm-countdown`` uses) scores an untagged completion by its
    last equation: right when that is right, wrong when an earlier right one is followed by a wrong one."""
    numbers, tree, target = problem
    e = render(tree)
    right = data.draw(st.sampled_from([e, f"{e} = {target}", f"{target} = {e}"]))
    assert lenient_score(numbers, target, f"{prose}So the equation is {right}{ending}") == 1.0
    wrong = data.draw(cd_wrong_side(numbers, tree, target))
    assume(tasks.last_equation(f"x {wrong}{ending}") != tasks.last_equation(f"x {right}"))
    completion = f"{prose}First: {right}. Then: {wrong}{ending}"
    assert lenient_score(numbers, target, completion) == 0.0, completion


@SETTINGS
@given(problem=countdown_problems(), prose=PROSE, ending=ENDINGS, data=st.data())
def test_lenient_countdown_rejects_misused_numbers_in_prose(problem, prose, ending, data):
    numbers, tree, target = problem
    answer, aimed_at = data.draw(cd_number_misuse(numbers, tree, target))
    assume(is_target(aimed_at))
    parsed = tasks.parse_expression(answer, return_numbers=True)
    assume(parsed is None or sorted(parsed[1]) != sorted(numbers))
    completion = f"{prose}The answer: {answer}{ending}"
    assert lenient_score(numbers, int(aimed_at), completion) == 0.0, completion


@SETTINGS
@given(problem=countdown_problems(), think=THINK, data=st.data())
def test_lenient_countdown_still_rejects_malformed_tags(problem, think, data):
    """Lenient reading applies only when no answer tag is present: a malformed tag scores 0 even when a right
    equation stands in the prose."""
    numbers, tree, target = problem
    completion = think + data.draw(cd_tags(numbers, tree, target)) + f" {render(tree)} = {target}"
    assert lenient_score(numbers, target, completion) == 0.0, completion
