"""Hugging Face audio datasets as corpora: read in place, one record per example.

    corpora.prepare("hf", ...) --read_hf_records--> list[Utterance] (before the label map)

Where the dataset is (DATA_DIR):
    a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (it holds
        state.json or dataset_dict.json), opened with `datasets.load_from_disk`;
    a .parquet or .arrow file, or a folder of them, opened with `datasets.load_dataset`, which
        converts them once into its cache (HF_DATASETS_CACHE); file names such as
        train-00000-of-00001.parquet name the splits, a lone file is split "train";
    a hub id ("owner/name") that is no local path, opened with `datasets.load_dataset` where
        there is network; without it, the error says what to save elsewhere and bring.
Every split is read. A single saved Dataset's split is its own (`Dataset.split`), else "train".

Fields, as in a manifest (manifests.py): label, speaker, and optionally id and group, named
as --columns maps them; `path` is the audio column, by default the one column whose feature
is `Audio`. A ClassLabel column reads as its class names. Every other column holding numbers
becomes a target of its name; columns holding neither are ignored with a logged note.

Audio is read undecoded (hfexamples.py): here only its header, for the duration; audio.py
decodes it with soundfile at the file's own sampling rate and resamples it like every other
input.

Records: id = the id column, else "<split>/<row>" (row: the example's 0-based index in its
split); path = a reference "hf:<location>?split=<split>&row=<row>&column=<audio column>"
(hfexamples.RowRef) that audio.read_audio resolves (location: the dataset's absolute path, or
its hub id); listed_path = the file name the dataset keeps beside the audio (often the
original file's); size = bytes of the encoded audio. As for every corpus, the cache's
fingerprint covers ids, labels, speakers, groups and targets only, so a moved dataset folder
resumes its cache.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import soundfile as sf

from .audio import audio_duration
from .hfexamples import RowRef, audio_columns, dataset_location, open_splits, undecoded
from .manifests import Manifest, json_cell, manifest_fields, manifest_targets, parse_columns, refuse_empty
from .records import RecordsError, Utterance

log = logging.getLogger(__name__)

BATCH = 64  # examples per read when measuring the audio


def audio_column(ds, mapped: str | None, where: str) -> str:
    """The dataset's column holding the audio: --columns path=COLUMN (any case), else the one
    Audio column; RecordsError naming the columns when there is none, several, or a mapped one
    that holds no audio."""
    names = {name.lower(): name for name in ds.features}
    has = f"its columns are {', '.join(ds.features)}"
    if mapped is not None:
        column = names.get(mapped)
        if column is None:
            raise RecordsError(f"{where}: no column {mapped!r} (for path, the audio) ({has}): map path to "
                               "the audio column, e.g. --columns path=audio")
        if column not in audio_columns(ds) and not holds_encoded_audio(ds.features[column]):
            raise RecordsError(f"{where}: column {column!r} holds {ds.features[column]}, not audio: map path "
                               "to a column of feature Audio (or of bytes and path)")
        return column
    found = audio_columns(ds)
    if len(found) != 1:
        what = "no column of feature Audio" if not found else f"several Audio columns ({', '.join(found)})"
        raise RecordsError(f"{where} has {what} ({has}): name the audio column with --columns path=COLUMN")
    return found[0]


def holds_encoded_audio(feature) -> bool:
    """A struct of `bytes` and `path`, as an Audio column is stored (cast to plain features)."""
    return isinstance(feature, dict) and {"bytes", "path"} <= set(feature)


def cell(value, feature) -> str:
    """One value as a manifest cell: a ClassLabel as its name, anything else as json_cell."""
    from datasets import ClassLabel

    if isinstance(feature, ClassLabel) and isinstance(value, int):
        return feature.int2str(value) if value >= 0 else ""  # -1: the example has no label
    return json_cell(value)


def split_manifest(ds, split: str, location: str, audio: str) -> Manifest:
    """The split's columns as a Manifest of cells (audio and other Audio columns left out; the
    audio column keeps its name so that --columns can map path to it)."""
    where = Path(f"{location} (split {split})")
    lower = [name.lower() for name in ds.features]
    twice = sorted({n for n in lower if lower.count(n) > 1})
    if twice:
        raise RecordsError(f"{where}: column(s) {', '.join(twice)} named twice (ignoring case): rename one "
                           "with Dataset.rename_column and save the dataset again")
    skipped = [c for c in audio_columns(ds) if c != audio]
    if skipped:
        log.warning("%s: Audio column(s) %s are ignored: the audio is read from %s", where, ", ".join(skipped), audio)
    table = ds.remove_columns([audio, *skipped]).to_dict()
    features = ds.features
    rows = [(row, {name.lower(): cell(values[row], features[name]) for name, values in table.items()})
            for row in range(ds.num_rows)]
    return Manifest(where, [name.lower() for name in features if name not in skipped], rows, "example")


def audio_facts(ds, column: str) -> list[tuple[float, int, str]]:
    """(seconds, bytes, the file name kept with the audio) of every example, from the encoded
    audio's header; (0.0, 0, name) for an example holding no audio (counted by the summary)."""
    facts = []
    for batch in undecoded(ds, column).iter(batch_size=BATCH):
        for value in batch[column]:
            data, path = (value or {}).get("bytes"), (value or {}).get("path") or ""
            if data:
                facts.append((bytes_duration(data), len(data), path))
            elif path and os.path.isfile(path):  # a parquet written without embedding the files
                facts.append((audio_duration(path), os.path.getsize(path), path))
            else:
                facts.append((0.0, 0, path))
    return facts


def bytes_duration(data: bytes) -> float:
    """Seconds, from the header of an encoded audio file held in memory; 0.0 when unreadable."""
    try:
        return float(sf.info(io.BytesIO(data)).duration)
    except (RuntimeError, TypeError) as e:  # soundfile.LibsndfileError is a RuntimeError
        log.warning("cannot read the header of %d bytes of dataset audio (%s); duration set to 0.0", len(data), e)
        return 0.0


def split_records(ds, split: str, location: str, columns: str | None) -> list[Utterance]:
    """The records of one split (no label map applied); RecordsError naming the example and
    the fix for a missing column, an empty field or a target that is not a number."""
    where = Path(f"{location} (split {split})")
    named = parse_columns(columns, Manifest(where, [c.lower() for c in ds.features], [], "example"))
    audio = audio_column(ds, named.get("path"), str(where))
    manifest = split_manifest(ds, split, location, audio)
    fields_ = manifest_fields(columns, manifest, defaults={"path": audio.lower()})
    targets = manifest_targets(manifest, fields_.values())
    records = []
    for (row, cells), (seconds, size, listed) in zip(manifest.rows, audio_facts(ds, audio)):
        refuse_empty(cells, row, manifest, fields_, ("label", "speaker"))
        label = cells[fields_["label"]]
        records.append(Utterance(
            id=cells[fields_["id"]] if "id" in fields_ else f"{split}/{row}",
            path=str(RowRef(location, split, row, audio)), label=label, speaker=cells[fields_["speaker"]],
            group=cells.get(fields_.get("group"), ""), duration=seconds, original_label=label,
            targets={t: float(cells[t]) for t in targets}, listed_path=listed, size=size,
        ))
    return records


def read_hf_records(corpus_dir, columns: str | None = None) -> list[Utterance]:
    """The records of every split of the dataset at `corpus_dir` (see the module docstring); no
    label map of this tool applied yet."""
    location = dataset_location(corpus_dir)
    records, where = [], {}
    for split, ds in open_splits(location).items():
        for r, row in zip(split_records(ds, split, location, columns), range(ds.num_rows)):
            if r.id in where:
                raise RecordsError(f"{location}: split {where[r.id][0]} example {where[r.id][1]} and split "
                                   f"{split} example {row} have the same id {r.id!r}: ids must be unique; map "
                                   "another column with --columns id=COLUMN")
            where[r.id] = (split, row)
            records.append(r)
    if not records:
        raise RecordsError(f"{location} holds no examples: pass a dataset with audio in it")
    if not any(r.size for r in records):
        raise RecordsError(f"none of the {len(records)} examples of {location} holds audio (no bytes, no file "
                           "at the path kept with it): save the dataset with its audio embedded "
                           "(save_to_disk or push_to_hub embed it)")
    return records
