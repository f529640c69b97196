"""MSP-Podcast: podcast segments with crowd-sourced labels, over 100k segments in recent
releases (Lotfian & Busso 2019).

Where to get it: licensed from the MSP lab, UT Dallas; the release is used as it unpacks:

    CORPUS_DIR/Labels/labels_consensus.csv
    CORPUS_DIR/Audios/MSP-PODCAST_0001_0008.wav

The CSV's columns FileName, EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, Split_Set are read
(others, such as Gender, are not). EmoClass letters are decoded by MSP_PODCAST_EMOTIONS;
EmoAct, EmoVal, EmoDom (1-7) become the targets arousal, valence, dominance. Group = Split_Set
as written (Train, Development, Test1, Test2), which the fold protocol `split` turns into the
official partition. Speaker = SpkrID; "Unknown" becomes one speaker per split
("Unknown_Train"): unknown speakers may be anyone, so they are kept together within their
split (never spread over folds) and never put on two sides of the split. Id = FileName
without ".wav". Default map `msp-podcast4` (neutral, happy, sad, angry); `msp-podcast8` keeps
the 8 primary emotions; both drop O (other) and X (no agreement), counted; `none` keeps every
segment (what dimensional work wants). Audio without a consensus label (a test set whose
labels are not public) is left out with a logged count.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import replace
from pathlib import Path

from ..audio import audio_duration
from ..manifests import as_number
from ..records import RecordsError, Utterance, listing
from .base import AUDIO_SUFFIXES, Recipe, corpus_folder

log = logging.getLogger(__name__)

LAYOUT = "Labels/labels_consensus.csv and Audios/<FileName>, as the release unpacks"
LABELS = "Labels/labels_consensus.csv"
AUDIO = "Audios"
COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Split_Set")
TARGETS = {"arousal": "EmoAct", "valence": "EmoVal", "dominance": "EmoDom"}
SPLIT = re.compile(r"Train|Development|Test\d+")
UNKNOWN = "unknown"  # SpkrID of segments whose speaker is not identified (any case)

MSP_PODCAST_EMOTIONS = {  # EmoClass of labels_consensus.csv
    "A": "angry", "S": "sad", "H": "happy", "U": "surprised", "F": "fearful",
    "D": "disgust", "C": "contempt", "N": "neutral",
    "O": "other", "X": "no_majority",  # X: the annotators agreed on no class, as IEMOCAP's xxx
}

MSP_PODCAST_MAPS = {
    # the common 4-class setting, and the 8 primary emotions (other and no-agreement dropped)
    "msp-podcast4": {c: c for c in ("angry", "happy", "neutral", "sad")},
    "msp-podcast8": {MSP_PODCAST_EMOTIONS[c]: MSP_PODCAST_EMOTIONS[c] for c in "ASHUFDCN"},
}


def msp_podcast_row(cells: dict[str, str], n: int, labels_csv: Path,
                    audio_dir: Path) -> Utterance:
    """One row of labels_consensus.csv (row n, the header being row 1) -> an Utterance whose
    duration is left at 0.0 (read once the file is known to exist)."""
    def refuse(what: str) -> RecordsError:
        return RecordsError(f"{labels_csv}, row {n}: {what}; fix the row or restore the file "
                            "from the release")

    name, code, split = cells["FileName"], cells["EmoClass"], cells["Split_Set"]
    if not name:
        raise refuse("FileName is empty")
    if code not in MSP_PODCAST_EMOTIONS:
        raise refuse(f"EmoClass {code!r} is none of {', '.join(MSP_PODCAST_EMOTIONS)}")
    if not SPLIT.fullmatch(split):
        raise refuse(f"Split_Set {split!r} is none of Train, Development, Test1, Test2, ...")
    targets = {}
    for target, column in TARGETS.items():
        value = as_number(cells[column])
        if value is None or not math.isfinite(value):
            raise refuse(f"{column} {cells[column]!r} is not a finite number")
        targets[target] = value
    speaker = cells["SpkrID"]
    if not speaker or speaker.lower() == UNKNOWN:
        speaker = f"Unknown_{split}"
    label = MSP_PODCAST_EMOTIONS[code]
    path = audio_dir / (name if Path(name).suffix else f"{name}.wav")
    return Utterance(
        id=Path(name).stem, path=str(path), label=label, speaker=speaker, group=split,
        original_label=label, targets=targets,
    )


def read_label_rows(labels_csv: Path) -> list[tuple[int, dict[str, str]]]:
    """(row number, {column: cell}) of every non-empty row of labels_consensus.csv, the header
    being row 1; RecordsError when a column of COLUMNS is missing."""
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise RecordsError(f"{labels_csv}, row 1: missing column(s) {', '.join(missing)} "
                               f"(header is {header}): use labels_consensus.csv of the release")
        return [(n, {k: v.strip() for k, v in zip(header, cells)})
                for n, cells in enumerate(reader, 2) if any(c.strip() for c in cells)]


def prepare_msp_podcast(corpus_dir: Path) -> list[Utterance]:
    """MSP-Podcast: id = FileName stem, speaker = SpkrID, group = Split_Set, targets arousal,
    valence, dominance (1-7), every EmoClass decoded."""
    corpus_dir = corpus_folder(corpus_dir, "msp-podcast", LAYOUT)
    labels_csv, audio_dir = corpus_dir / LABELS, corpus_dir / AUDIO
    for needed in (labels_csv, audio_dir):
        if not needed.exists():
            raise RecordsError(f"{needed} does not exist: the msp-podcast recipe expects "
                               f"{LAYOUT}; pass the release folder that holds {LABELS} and {AUDIO}/")
    # one listing instead of a stat per row: the release has over 100k files in one folder
    present = {e.name for e in os.scandir(audio_dir) if e.is_file() and not e.name.startswith(".")}
    rows = read_label_rows(labels_csv)
    records, absent, listed = [], [], set()
    for n, cells in rows:
        cells = {c: cells.get(c, "") for c in COLUMNS}
        r = msp_podcast_row(cells, n, labels_csv, audio_dir)
        listed.add(Path(r.path).name)
        if Path(r.path).name not in present:
            absent.append(r.path)
            continue
        records.append(replace(r, duration=audio_duration(Path(r.path))))
    if absent:
        raise RecordsError(
            f"{len(absent)} segments of {labels_csv} have no audio file, for example "
            f"{listing(absent)}; the copy of the release looks incomplete: restore "
            f"{AUDIO}/ from it"
        )
    unlabelled = sorted(n for n in present - listed if Path(n).suffix.lower() in AUDIO_SUFFIXES)
    if unlabelled:
        log.warning("%d audio files in %s have no row in %s and are left out (a test set whose "
                    "labels are not public?): %s", len(unlabelled), audio_dir, LABELS,
                    listing(unlabelled))
    if not records:
        raise RecordsError(f"{labels_csv} has a header but no rows: restore it from the release")
    return records


RECIPE = Recipe("msp-podcast", prepare_msp_podcast, default_label_map="msp-podcast4",
                label_maps=MSP_PODCAST_MAPS)
