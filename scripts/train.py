"""Thin wrapper: ``python scripts/train.py cartpole [field=value ...]`` is ``esx train cartpole ...``."""
import sys

from esx_envs.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
