#!/usr/bin/env python3
"""Stage 2 without installing the console script: `python train.py CACHE --layer N --head qkv --out RUN`.

Same options as `ser-cache train --help`.
"""
import sys

from ser_cache.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
