"""Thin wrapper: ``python scripts/bench.py [--quick] [--cases B1a,B2] [--json out.json]`` == ``esx bench ...``."""
import sys

from esx_envs.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
