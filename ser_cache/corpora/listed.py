"""Corpora listed in a file rather than laid out in folders: a manifest you write (csv), EmoBox's
metadata (emobox), a Hugging Face audio dataset (hf). Their readers are modules of their own
(manifests.py, emobox.py, hfdatasets.py); a recipe here turns CORPUS_DIR and the corpus options
into that reader's call.

csv      Any corpus listed in a manifest you write: a CSV file (UTF-8, a BOM is fine), or JSON
         Lines when its name ends in .jsonl (one object per line, the columns as keys). The
         fields are path, label, speaker and optionally id and group; `--columns
         path=file,label=emotion,speaker=spk_id` reads them from columns of other names.
         Paths may be absolute; relative ones start from the audio root (`--audio-root`,
         default the manifest's folder). Symlinks are followed. The id defaults to the path
         under the audio root without its extension ("a/b.wav" -> "a/b"), so a path outside
         the audio root needs an id column; ids, and so the cache's identity, do not depend on
         where the corpus lies: after moving it, point `--audio-root` at the new place.
         Records keep the path as listed (`listed_path`) beside the resolved one (`path`).
         The manifest is `--csv PATH`, or CORPUS_DIR itself when it is a file, or
         CORPUS_DIR/utterances.csv. Every other column holding numbers becomes a target of its
         name (`path,label,speaker,arousal,valence`: two targets); each of its cells must then
         be a finite number, an empty cell is refused naming its row. Columns without any
         number (a transcript) are ignored, with a logged note naming them. A group column
         holding split names (train, development, test) feeds the fold protocol `split`.
         Refused, with the row and the fix: a missing column, an empty path, label, speaker or
         id, two rows with one id or one file, a path outside the audio root without an id,
         a manifest none of whose files exists. A missing or unreadable file among others is
         kept: the summary names it, and the extractor skips it and records why.
emobox   A corpus as the EmoBox benchmark describes it (github.com/emo-box/EmoBox), CORPUS_DIR
         being its data/<dataset> folder (or the jsonl itself):
             CORPUS_DIR/<dataset>.jsonl  {"key": ..., "wav": "downloads/...", "emo": ..., ...}
             CORPUS_DIR/label_map.json   {"emo" value: class name}
         Id = key; the wav path starts from `--audio-root` (default CORPUS_DIR); label =
         original label = the class label_map.json names (EmoBox's spelling: "Fear",
         "Surprise"). Speakers come from the file names by the dataset's own rule
         (EMOBOX_SPEAKERS: ravdess, emodb, shemo, iemocap as their recipes read them; urdu
         SM5_F63_N091 -> SM5) or `--speaker-pattern`. Its fold_K files are read by
         `train --folds-from` (folds.py).
hf       A Hugging Face audio dataset, CORPUS_DIR being a folder written by save_to_disk, a
         .parquet or .arrow file or a folder of them, or a hub id where there is network.
             CORPUS_DIR/dataset_dict.json, CORPUS_DIR/train/data-00000-of-00001.arrow, ...
         Every split is read. The fields are those of a csv manifest, `--columns` mapping them
         (path = the audio column, by default the one of feature Audio); a ClassLabel column
         reads as its names. Id = the id column, else "<split>/<row>". The audio is decoded
         from the dataset at its own rate.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ..emobox import find_jsonl, read_emobox
from ..hfdatasets import read_hf_records
from ..hfexamples import RowRef, dataset_location
from ..manifests import audio_folder, find_manifest, read_manifest_records
from ..records import Utterance
from .base import Recipe, SpeakerRule
from .emodb import EMODB_SPEAKER
from .iemocap import IEMOCAP_SPEAKER
from .ravdess import RAVDESS_SPEAKER
from .shemo import SHEMO_SPEAKER

# URDU (Latif et al. 2018), benchmarked by EmoBox, has no recipe here: SM5_F63_N091 is
# speaker SM5, file 63, N(eutral) 91
URDU_SPEAKER = SpeakerRule(re.compile(r"(S[FM]\d+)_F\d+_[A-Z]\d+"), lambda m: m[1], "SM5_F63_N091 -> SM5")
# EmoBox's dataset name (its jsonl's) -> how its file names give the speaker
EMOBOX_SPEAKERS = {
    "ravdess": RAVDESS_SPEAKER,
    "emodb": EMODB_SPEAKER,
    "shemo": SHEMO_SPEAKER,
    "iemocap": IEMOCAP_SPEAKER,
    "urdu": URDU_SPEAKER,
}


def prepare_csv(corpus_dir: Path, csv_path: Path | None = None, audio_root: Path | None = None,
                columns: str | None = None) -> list[Utterance]:
    """Any corpus from a manifest (CSV, or JSON Lines by suffix) with the fields path, label,
    speaker[, id][, group][, numeric targets...], named as --columns maps them (manifests.py)."""
    return read_manifest_records(corpus_dir, csv_path, audio_root, columns)


def prepare_emobox(corpus_dir: Path, audio_root: Path | None = None,
                   speaker_pattern: str | None = None) -> list[Utterance]:
    """EmoBox metadata, data/<dataset>/<dataset>.jsonl with its label_map.json (emobox.py):
    id = key, label as EmoBox's label map names it, speaker from the file name."""
    return read_emobox(corpus_dir, EMOBOX_SPEAKERS, audio_root, speaker_pattern)


def prepare_hf(corpus_dir, columns: str | None = None) -> list[Utterance]:
    """A Hugging Face audio dataset, every split (hfdatasets.py): fields as a csv manifest's,
    named as --columns maps them; audio read from the dataset."""
    return read_hf_records(corpus_dir, columns)


def csv_source(corpus_dir: Path, records: list[Utterance], csv_path: Path | None = None,
               audio_root: Path | None = None, columns: str | None = None) -> dict:
    """The manifest read and the folder its relative paths started from."""
    manifest = find_manifest(corpus_dir, csv_path)
    return {"manifest": str(manifest), "audio_root": str(audio_folder(audio_root, manifest))}


def emobox_source(corpus_dir: Path, records: list[Utterance], audio_root: Path | None = None,
                  speaker_pattern: str | None = None) -> dict:
    """The jsonl read and the folder its wav paths started from."""
    manifest = find_jsonl(corpus_dir)
    return {"manifest": str(manifest), "audio_root": str(audio_folder(audio_root, manifest))}


def hf_source(corpus_dir, records: list[Utterance], columns: str | None = None) -> dict:
    """The dataset (an absolute path or a hub id), its examples per split, its audio column(s)."""
    refs = [RowRef.parse(r.path) for r in records]
    return {"data": dataset_location(corpus_dir), "splits": dict(Counter(ref.split for ref in refs)),
            "audio_columns": sorted({ref.column for ref in refs})}


CSV_RECIPE = Recipe("csv", prepare_csv, options=("csv_path", "audio_root", "columns"),
                    describe_source=csv_source)
EMOBOX_RECIPE = Recipe("emobox", prepare_emobox, options=("audio_root", "speaker_pattern"),
                       describe_source=emobox_source)
HF_RECIPE = Recipe("hf", prepare_hf, options=("columns",), describe_source=hf_source)
