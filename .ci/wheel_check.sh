#!/usr/bin/env bash
# The package as users get it: `python -m build` (the sdist, and the wheel built from it), the wheel installed with
# the `rl` and `interop` extras (not editable) in a fresh venv, then, from outside the checkout so only the wheel is
# importable: the README quickstart, the shipped corpus, the task entry points, Flax / Equinox / evosax models through
# esx.interop (.ci/interop_smoke.py) and a 5-generation `esx train cartpole`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
python3 -m venv "$WORK/venv"
WHEEL="$(ls "$WORK"/dist/esx_jax-*.whl)"
"$WORK/venv/bin/python" -m pip install --quiet "$WHEEL[rl,interop]"
cd "$WORK"
"$WORK/venv/bin/python" - "$ROOT/README.md" <<'PY'
import importlib.metadata, re, sys

import esx, esx.run, esx_envs
from esx_envs.egg import text_data

assert "site-packages" in esx.__file__ and "site-packages" in esx_envs.__file__, (esx.__file__, esx_envs.__file__)
assert importlib.metadata.version("esx-jax") == esx.__version__
assert {"rl", "egg", "llm"} <= set(esx.run.task_classes()), esx.run.task_classes()
assert len(text_data.load_split().train) > 10**6                      # the corpus is package data
readme = open(sys.argv[1]).read()
exec(compile(re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1), "README-quickstart", "exec"), {})
PY
"$WORK/venv/bin/python" "$ROOT/.ci/interop_smoke.py"      # Flax linen / NNX, Equinox, evosax via esx.interop
"$WORK/venv/bin/esx" --version
"$WORK/venv/bin/esx" train cartpole generations=5 --run-dir "$WORK/cartpole" --no-progress
test -s "$WORK/cartpole/summary.json"
echo "wheel check: ok ($(basename "$WHEEL"))"
