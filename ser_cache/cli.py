"""The `ser-cache` command line: one click group, thin commands.

Each command's docstring is its help. The work lives in the modules named after each stage;
a command only turns options into a call and failures into `click.ClickException`.
"""
from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="ser-cache")
def main():
    """Speech emotion recognition on cached Whisper encoder layers.

    Extract every encoder layer once (`extract`), then train and compare pooling heads on
    any layer as often as you like (`train`, `sweep`, `report`).
    """


# --- stage 1: corpus -> cache -------------------------------------------------------------

# --- stage 2: cache -> heads, metrics ------------------------------------------------------

# --- layer-wise comparisons ----------------------------------------------------------------

# --- corpora: download and check -----------------------------------------------------------

# --- using a trained head --------------------------------------------------------------------


if __name__ == "__main__":
    main()
