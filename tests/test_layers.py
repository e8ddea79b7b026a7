"""Imports run one way: ``esx_envs`` -> ``esx``, never back; the engine imports only jax, optax, numpy and the
standard library.

The check walks the AST of every module of both packages, so function-local imports count, and it also reads
every string constant: a dotted name such as ``"esx_envs.rl:policy"`` handed to ``importlib`` or to an
entry-point lookup is an import too. Layers (docs/architecture.md):

* engine: the modules directly in ``esx/`` -- jax, optax, numpy, the standard library and other engine modules;
* runner: ``esx/run/`` -- the engine, its own modules, and orbax / tqdm / matplotlib / tensorboardX;
* interop: ``esx/interop/`` -- the engine, its own modules, and the framework each adapter serves (flax, equinox,
  evosax); never the runner (``import esx`` loads none of them: the engine never imports ``esx.interop``);
* application: ``esx_envs`` (the ``envs/`` folder) -- anything, but never imported by ``esx``.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ALLOWED = {"jax", "jaxlib", "optax", "numpy"}
RUNNER_ALLOWED = ENGINE_ALLOWED | {"orbax", "tqdm", "matplotlib", "tensorboardX"}
INTEROP_ALLOWED = ENGINE_ALLOWED | {"flax", "equinox", "evosax"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
DOTTED = re.compile(r"\besx_envs(\.[A-Za-z_][A-Za-z0-9_]*)*\b")


def _modules(folder: Path, package: str):
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).with_suffix("")
        parts = [package, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, imported top-level-qualified name)`` of every import statement, anywhere in the file, and every
    string constant (docstrings aside) that names an ``esx_envs`` module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((node.lineno, name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out += [(node.lineno, m.group(0)) for m in DOTTED.finditer(node.value)]
    return out


def _violations(folder: Path, package: str, rule, root: Path = ROOT) -> list[str]:
    bad = []
    for module, path in _modules(folder, package):
        for line, name in _imports(path, module):
            why = rule(module, name)
            if why:
                bad.append(f"{path.relative_to(root)}:{line}: {module} imports {name} ({why})")
    return bad


def _engine_rule(module: str, name: str) -> str | None:
    top = name.split(".")[0]
    if name.startswith("esx_envs") or top == "esx_envs":
        return "the engine never imports the application"
    in_runner = module.startswith("esx.run")
    in_interop = module.startswith("esx.interop")
    if top == "esx":
        if not in_runner and name.startswith("esx.run"):
            return "the engine never imports the runner"
        if not in_interop and name.startswith("esx.interop"):
            return "the engine and the runner never import esx.interop"
        return None
    layer, allowed = (("runner", RUNNER_ALLOWED) if in_runner else ("interop", INTEROP_ALLOWED) if in_interop
                      else ("engine", ENGINE_ALLOWED))
    if top in allowed or top in STDLIB:
        return None
    return f"{layer} modules import only {sorted(allowed)} and the standard library"


def test_engine_and_runner_import_only_what_their_layer_allows():
    assert _violations(ROOT / "esx", "esx", _engine_rule) == []


def test_no_reverse_edges_in_docstrings_or_lookups_either():
    """Also the strings: a lookup like ``importlib.import_module("esx_envs.rl")`` in esx/ is a reverse edge."""
    bad = []
    for module, path in _modules(ROOT / "esx", "esx"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
                fname = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                if fname in ("import_module", "__import__", "EntryPoint", "find_spec"):
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and "esx_envs" in str(arg.value):
                            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {fname}({arg.value!r})")
    assert bad == []


def test_application_imports_esx_only_through_its_public_modules():
    """``esx_envs`` may import ``esx`` (one way); it must not import a private engine module (``esx._members``)."""
    def rule(module, name):
        if name.startswith("esx.") and any(p.startswith("_") for p in name.split(".")[1:]):
            return "a private engine module"
        return None

    assert _violations(ROOT / "envs", "esx_envs", rule) == []


@pytest.mark.parametrize("bad_source, expected", [
    ("def f():\n    import esx_envs.rl\n", "the engine never imports the application"),
    ("def f():\n    from esx_envs import rl\n", "the engine never imports the application"),
    ("import importlib\nLOOKUP = {'rl': 'esx_envs.rl.task:setup'}\n", "the engine never imports the application"),
    ("def f():\n    import orbax.checkpoint\n", "engine modules import only"),
    ("import gymnax\n", "engine modules import only"),
    ("from esx.run import train\n", "the engine never imports the runner"),
    ("import flax.linen as nn\n", "engine modules import only"),
    ("from esx.interop import linen\n", "never import esx.interop"),
])
def test_the_walk_catches_each_kind_of_reverse_edge(tmp_path, bad_source, expected):
    """The checker itself: each kind of forbidden import, planted in a fake engine module, is reported."""
    pkg = tmp_path / "esx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "planted.py").write_text(bad_source)
    found = _violations(pkg, "esx", _engine_rule, root=tmp_path)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("layer, ok, bad, expected_bad", [
    ("run", "def f():\n    import orbax.checkpoint as ocp\n    import tqdm\n",
     "def f():\n    from esx_envs.rl import task\n", 1),
    ("interop", "import flax.linen as nn\nimport equinox as eqx\nimport evosax\n",
     "import orbax.checkpoint\nfrom esx_envs import rl\n", 2),
])
def test_runner_and_interop_may_import_their_extras_but_not_tasks(tmp_path, layer, ok, bad, expected_bad):
    """``esx/run`` may import orbax / tqdm, ``esx/interop`` flax / equinox / evosax; neither imports a task (nor
    interop the runner's extras)."""
    pkg = tmp_path / "esx"
    (pkg / layer).mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / layer / "__init__.py").write_text("")
    (pkg / layer / "ok.py").write_text(ok)
    (pkg / layer / "bad.py").write_text(bad)
    found = _violations(pkg, "esx", _engine_rule, root=tmp_path)
    assert len(found) == expected_bad and all(f"{layer}/bad.py" in f for f in found), found


MAX_MODULE_LINES = 520   # "no engine module above ~500 lines"
MAX_FUNCTION_LINES = 120  # code lines of one function, its docstring not counted


def _engine_files():
    return sorted((ROOT / "esx").rglob("*.py"))


@pytest.mark.parametrize("path", _engine_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_modules_and_functions_stay_readable(path):
    """Sizes a reader can hold, and every public function and class documented."""
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            doc_lines = len(doc.splitlines()) if doc else 0
            length = node.end_lineno - node.lineno + 1 - doc_lines
            assert length <= MAX_FUNCTION_LINES, f"{node.name}: {length} lines"
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            assert ast.get_docstring(node), f"{path.name}: public {node.name} has no docstring"
