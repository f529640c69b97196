"""The documentation: a README a newcomer can read, links that lead somewhere, and a quick start
that runs as written (on a tiny synthetic corpus and a tiny random Whisper instead of RAVDESS
and Whisper base)."""
from __future__ import annotations

import csv
import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from ser_cache.cli import main

from conftest import TINY_DIMS, make_checkpoint, write_corpus

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 210

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move detail to docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading(page):
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def quick_start() -> list[list[str]]:
    """The `ser-cache` commands of the README's quick start, split as a shell would."""
    text = README.read_text()
    section = text.split("\n## Quick start", 1)[1]
    block = re.search(r"^```\n(.*?)^```", section, re.S | re.M).group(1)
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert commands and all(c[0] == "ser-cache" for c in commands), block
    return [c[1:] for c in commands]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def replace_option(args: list[str], name: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(name) + 1] = value
    return args


# What the tiny run changes in each command besides the data and the model: the sizes, so that
# every head trains in seconds. The commands' own options are kept as the README shows them.
SMALL = {"train": ["--epochs", "2", "--folds", "3", "--device", "cpu", "--compute-dtype", "float32"],
         "sweep": ["--epochs", "2", "--folds", "3", "--jobs", "1", "--device", "cpu", "--compute-dtype", "float32"]}


def test_the_quick_start_runs_as_written(tmp_path, monkeypatch, one_torch_thread):
    # conftest's tiny Whisper with 4 blocks instead of 2, so that the README's `--layer 3` exists
    tiny_checkpoint = make_checkpoint(tmp_path / "tiny-4-blocks.pt", {**TINY_DIMS, "n_audio_layer": 4})
    monkeypatch.setattr(importlib.import_module("ser_cache.sweeping"), "available_cores", lambda: 1)
    commands = quick_start()
    assert [c[0] for c in commands] == ["download", "extract", "sweep", "train", "export", "predict"]
    corpus = tmp_path / "corpus"
    records = write_corpus(corpus, n_speakers=6, per_speaker=3, seconds=(0.3, 0.8))
    with open(corpus / "utterances.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "speaker"])
        writer.writerows([Path(r.path).name, r.label, r.speaker] for r in records)
    monkeypatch.chdir(tmp_path)  # the README's relative paths (cache/, sweeps/, runs/) land here

    outputs = {}
    for args in commands:
        name = args[0]
        if name == "download":  # the network: the tiny corpus stands in for what it fetches
            continue
        if name == "extract":
            args = replace_option(args, "--corpus", "csv")
            args = replace_option(args, "--model", str(tiny_checkpoint))
            args[1] = str(corpus)
        if name == "predict":
            args = [*args[:2], records[0].path, *args[3:], "--json"]
        result = CliRunner().invoke(main, [*args, *SMALL.get(name, [])], catch_exceptions=False)
        assert result.exit_code == 0, f"ser-cache {shlex.join(args)}:\n{result.output}"
        outputs[name] = result.stdout

    extract, sweep, train, export, predict = commands[1:]
    assert (tmp_path / option(extract, "--out") / "cache.json").is_file()
    sweep_dir = tmp_path / option(sweep, "--out")
    for written in ("summary.md", "results.csv", "ua_by_layer.png"):
        assert (sweep_dir / written).is_file(), written
    metrics = json.loads((tmp_path / option(train, "--out") / "metrics.json").read_text())
    assert 0 <= metrics["ua"]["mean"] <= 1
    assert (tmp_path / option(export, "--out")).is_file()
    predicted = json.loads(outputs["predict"])
    rows = predicted if isinstance(predicted, list) else [predicted]
    assert rows and all(r["prediction"] in {"angry", "happy", "sad"} for r in rows), outputs["predict"]
