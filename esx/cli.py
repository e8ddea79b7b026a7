"""The ``esx`` command line: ``esx train``, ``esx eval``, ``esx bench``.

Each subcommand lives in its own module and is imported only when used, so ``import esx`` stays light.
"""
from __future__ import annotations

import sys

COMMANDS = {
    "train": ("esx.driver_cli", "train_main", "train a named config (esx train --help)"),
    "eval": ("esx.driver_cli", "eval_main", "evaluate a run directory (esx eval --help)"),
    "bench": ("esx.bench", "main", "run the benchmark suite (esx bench --help)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: esx <command> [options]\n\ncommands:")
        for name, (_, _, doc) in COMMANDS.items():
            print(f"  {name:<8}{doc}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"esx: unknown command {cmd!r}; valid commands are {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    module, func, _ = COMMANDS[cmd]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
