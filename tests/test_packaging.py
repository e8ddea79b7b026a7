"""The distribution `esx-jax`: `python -m build` makes an sdist and a wheel that hold every module, the shipped
corpus, the entry points and the right name (.ci/wheel_check.sh installs that wheel in a fresh venv and runs it)."""
import configparser
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "esx-jax"
CORPUS = "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel built from it (python -m build: the wheel comes from the unpacked sdist, so the
    checkout's build/ folder cannot leak stale files into it)."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,), (sdist,) = out.glob("esx_jax-*.whl"), out.glob("esx_jax-*.tar.gz")
    return wheel, sdist


def source_modules() -> set[str]:
    """Every module of the checkout, named as installed: esx/... and envs/... -> esx_envs/..."""
    names = {p.relative_to(ROOT).as_posix() for d in ("esx", "envs") for p in (ROOT / d).rglob("*.py")
             if "__pycache__" not in p.parts}
    return {"esx_envs/" + n[len("envs/"):] if n.startswith("envs/") else n for n in names}


def test_wheel_holds_the_packages_data_entry_points_and_name(dist):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = configparser.ConfigParser(delimiters=("=",))
        entry_points.read_string(z.read(f"{info}/entry_points.txt").decode())
        corpus = z.read(f"esx_envs/data/{CORPUS}")
    for module in ("esx/__init__.py", "esx/run/loop.py", "esx/interop/__init__.py", "esx_envs/cli.py"):
        assert module in names, module
    missing = source_modules() - names
    assert not missing, f"modules left out of the wheel (add their package to [tool.setuptools] packages): {missing}"
    assert corpus == (ROOT / "envs" / "data" / CORPUS).read_bytes()
    assert re.search(r"^Name: esx-jax$", metadata, re.M), metadata[:300]
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert {"driver", "rl", "llm", "interop", "all", "dev"} <= extras, extras
    assert not re.search(r"^Requires-Dist: esx\[", metadata, re.M)          # extras name the new distribution
    assert entry_points["console_scripts"]["esx"].strip() == "esx_envs.cli:main"
    assert {"rl", "egg", "llm"} <= set(entry_points["esx.tasks"]), dict(entry_points["esx.tasks"])


def test_sdist_holds_the_corpus_and_the_license(dist):
    _, sdist = dist
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {f"envs/data/{CORPUS}", "LICENSE", "pyproject.toml", "esx/interop/__init__.py"} <= names


def test_name_extras_and_installed_metadata_agree():
    """pyproject's name and version are what importlib.metadata reports for the installed checkout, and every extra
    that builds on another names `esx-jax` (`esx` on PyPI is an unrelated project)."""
    import esx

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == NAME and project["version"] == esx.__version__
    assert importlib.metadata.version(NAME) == esx.__version__
    for extra, requirements in project["optional-dependencies"].items():
        for req in requirements:
            name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
            assert name != "esx", (extra, req)
