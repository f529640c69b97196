#!/usr/bin/env python3
"""Stage 1 without installing the console script: `python extract.py DATA_DIR --corpus ... --model ... --out ...`.

Same options as `ser-cache extract --help`.
"""
import sys

from ser_cache.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
