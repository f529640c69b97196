"""Real corpora through the manifests users write (marked e2e): URDU from a CSV of absolute
paths with other column names, RAVDESS from an EmoBox-style jsonl under another audio root.
Each gives the records of today's reader and, on a few utterances, the same tiny.en states."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ser_cache.cache import open_cache
from ser_cache.cli import main
from ser_cache.corpora import RAVDESS_EMOTIONS, prepare

from conftest import _e2e_missing, real_checkpoint

pytestmark = pytest.mark.e2e

FEW = 3  # utterances encoded per reader: --limit picks the same ones by id


@pytest.fixture(scope="module")
def urdu_dir() -> Path:
    path = Path(os.environ.get("SER_CACHE_URDU", Path(__file__).resolve().parents[2] / "shared" / "data" / "urdu"))
    if not (path / "utterances.csv").is_file():
        _e2e_missing(str(path / "utterances.csv"))
    return path.resolve()


def fields(records) -> list[tuple]:
    return sorted((r.id, r.label, r.speaker, r.group) for r in records)


def states(cache_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    cache = open_cache(cache_dir)
    out = {}
    for layer in cache.layers:
        data = cache.read_layer(layer)
        out.update({(i, layer): data.frames[data.offsets[k]:data.offsets[k + 1]] for k, i in enumerate(data.ids)})
    return out


def extract(data, out: Path, *options) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in ("extract", data, *options, "--model", real_checkpoint("tiny.en"),
                                                         "--out", out, "--mode", "short", "--limit", FEW,
                                                         "--device", "cpu")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return states(out)


def same_states(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs) and len({uid for uid, _ in ours}) == FEW
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_urdu_from_a_csv_of_absolute_paths_with_other_column_names(urdu_dir, tmp_path):
    with open(urdu_dir / "utterances.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    manifest = tmp_path / "urdu.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "emotion", "spk_id"])
        w.writerows([str(urdu_dir / r["path"]), r["label"], r["speaker"]] for r in rows)
    options = ["--corpus", "csv", "--columns", "path=file,label=emotion,speaker=spk_id", "--audio-root", urdu_dir]
    today = prepare("csv", urdu_dir).records
    ours = prepare("csv", manifest, columns="path=file,label=emotion,speaker=spk_id", audio_root=urdu_dir).records
    assert len(today) == 400 and fields(ours) == fields(today)
    same_states(extract(manifest, tmp_path / "ours", *options), extract(urdu_dir, tmp_path / "today", "--corpus", "csv"))


def test_ravdess_from_an_emobox_jsonl_under_another_audio_root(ravdess_dir, tmp_path):
    """EmoBox's layout: data/ravdess/ravdess.jsonl with wav paths downloads/ravdess/...; the
    audio root holds downloads/ (a symlink to two actors here)."""
    corpus = tmp_path / "ravdess"  # today's reader on the same two actors
    corpus.mkdir()
    for actor in ("Actor_01", "Actor_02"):
        (corpus / actor).symlink_to(ravdess_dir / actor)
    root = tmp_path / "root"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / "ravdess").symlink_to(corpus)
    data = tmp_path / "data" / "ravdess"
    data.mkdir(parents=True)
    files = sorted(corpus.glob("Actor_*/*.flac"))
    with open(data / "ravdess.jsonl", "w", encoding="utf-8") as f:
        for p in files:
            wav = f"downloads/ravdess/{p.parent.name}/{p.name}"
            f.write(json.dumps({"key": p.stem, "wav": wav, "emo": p.stem.split("-")[2], "length": 3.5}) + "\n")
    (data / "label_map.json").write_text(json.dumps(RAVDESS_EMOTIONS))  # EmoBox's codes -> this tool's names
    today = prepare("ravdess", corpus).records
    ours = prepare("emobox", data, audio_root=root).records
    assert len(today) == 120 and fields(ours) == fields(today)
    same_states(extract(data, tmp_path / "ours", "--corpus", "emobox", "--audio-root", root),
                extract(corpus, tmp_path / "today", "--corpus", "ravdess"))
