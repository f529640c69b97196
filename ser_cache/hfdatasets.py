"""Hugging Face audio datasets as corpora: read in place, one record per example.

    corpora.prepare("hf", ...) --read_hf_records--> list[Utterance] (before the label map)
    audio.read_audio("hf:...") --read_row_audio--> one example's samples, at its own rate

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

Audio is read undecoded (`Audio(decode=False)`: the encoded file's bytes, or a path to it)
and decoded here with soundfile at the file's own sampling rate; audio.py resamples it like
every other input. (datasets' own decoding needs torchcodec and ffmpeg, which this tool does
not require, and would resample to the feature's rate first: a second, needless resampling.)

Records: id = the id column, else "<split>/<row>" (row: the example's 0-based index in its
split); path = a reference "hf:<location>?split=<split>&row=<row>&column=<audio column>" that
audio.read_audio resolves (location: the dataset's absolute path, or its hub id); listed_path
= the file name the dataset keeps beside the audio (often the original file's); size = bytes
of the encoded audio. As for every corpus, the cache's fingerprint covers ids, labels,
speakers, groups and targets only, so a moved dataset folder resumes its cache.
"""
from __future__ import annotations

import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import numpy as np
import soundfile as sf

from .audio import DATASET_REF_PREFIX, AudioError, audio_duration, read_audio
from .manifests import Manifest, json_cell, manifest_fields, manifest_targets, parse_columns, refuse_empty
from .records import RecordsError, Utterance

log = logging.getLogger(__name__)

SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes into its folder
DATA_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}  # file suffix -> datasets' builder
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "owner/name" (or a canonical "name")
SINGLE_SPLIT = "train"  # the split of a dataset saved without one, as load_dataset names it
BATCH = 64  # examples per read when measuring the audio


@dataclass(frozen=True)
class RowRef:
    """Where one example's audio is: a dataset (absolute path or hub id), split, row, column."""

    location: str
    split: str
    row: int
    column: str

    def __str__(self) -> str:
        query = urlencode({"split": self.split, "row": self.row, "column": self.column})
        return f"{DATASET_REF_PREFIX}{self.location}?{query}"

    @classmethod
    def parse(cls, text: str) -> RowRef:
        """The reference `str(ref)` wrote; AudioError when `text` is not one."""
        location, _, query = text[len(DATASET_REF_PREFIX):].rpartition("?")
        values = {k: v[0] for k, v in parse_qs(query).items()}
        if not (text.startswith(DATASET_REF_PREFIX) and location and {"split", "row", "column"} <= set(values)
                and values["row"].isdigit()):
            raise AudioError(f"not a dataset example reference ({DATASET_REF_PREFIX}LOCATION?split=S&row=N&column=C)")
        return cls(location, values["split"], int(values["row"]), values["column"])


# --- opening a dataset --------------------------------------------------------------------------

def dataset_location(data_dir) -> str:
    """The dataset's location: DATA_DIR as an absolute path when it exists, else a hub id;
    RecordsError when it is neither."""
    path = Path(data_dir).expanduser()
    if path.exists():
        return os.path.normpath(path.absolute())
    if HUB_ID.fullmatch(str(data_dir)):
        return str(data_dir)
    raise RecordsError(f"{data_dir} does not exist: pass a folder written by save_to_disk, a .parquet or "
                       ".arrow file (or a folder of them), or a hub id such as owner/name")


_open_lock = threading.RLock()  # extraction reads examples from several threads


def open_splits(location: str) -> dict[str, object]:
    """{split name: datasets.Dataset} of the dataset at `location`, opened once per process."""
    with _open_lock:
        return _open_splits(location)


@lru_cache(maxsize=8)
def _open_splits(location: str) -> dict[str, object]:
    import datasets

    path = Path(location)
    if not path.exists():
        opened = load_hub(location)
    elif path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS):
        opened = datasets.load_from_disk(str(path))
    else:
        opened = load_files(path)
    if isinstance(opened, datasets.Dataset):
        return {str(opened.split) if opened.split else SINGLE_SPLIT: opened}
    return dict(opened)


def load_files(path: Path):
    """A .parquet or .arrow file, or a folder of them, as a DatasetDict."""
    import datasets

    if path.is_file():
        builder = DATA_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise RecordsError(f"{path} is not a .parquet or .arrow file: pass one, a folder of them, or a "
                               "folder written by save_to_disk")
        return datasets.load_dataset(builder, data_files=str(path))
    if not any(p.suffix.lower() in DATA_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise RecordsError(f"{path} holds no dataset: neither {' nor '.join(SAVED_MARKERS)} (a save_to_disk "
                           "folder) nor .parquet or .arrow files; pass the folder the dataset was saved to")
    return datasets.load_dataset(str(path))


def load_hub(dataset_id: str):
    """A hub dataset, where there is network; RecordsError saying what to bring where there is none."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id)
    # The hub fails in many ways (no network, no such dataset, a gated one, several configs);
    # each comes down to one fix, named below with the cause's first line.
    except Exception as e:  # noqa: BLE001
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecordsError(
            f"{dataset_id!r} is no local path and could not be loaded from the Hugging Face hub ({cause}): "
            f"where there is network, run python -c \"import datasets; datasets.load_dataset('{dataset_id}')"
            ".save_to_disk('DIR')\" (name the config after the id if it has several), bring DIR here and "
            "pass it as DATA_DIR"
        ) from None


# --- the records --------------------------------------------------------------------------------

def audio_columns(ds) -> list[str]:
    """The names of the columns whose feature is Audio."""
    from datasets import Audio

    return [name for name, feature in ds.features.items() if isinstance(feature, Audio)]


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


def undecoded(ds, column: str):
    """`ds` reduced to `column`, whose audio reads as {"bytes", "path"} instead of decoded."""
    from datasets import Audio

    ds = ds.select_columns([column])
    return ds.cast_column(column, Audio(decode=False)) if column in audio_columns(ds) else ds


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


# --- reading one example's audio ---------------------------------------------------------------

@lru_cache(maxsize=32)
def _audio_table(location: str, split: str, column: str):
    return undecoded(open_splits(location)[split], column)


def row_audio(text: str) -> dict:
    """{"bytes", "path"} of the example a reference names; AudioError when it is not there."""
    ref = RowRef.parse(text)
    try:
        splits = open_splits(ref.location)
    except RecordsError as e:
        raise AudioError(f"the dataset cannot be opened: {e}") from None
    if ref.split not in splits:
        raise AudioError(f"the dataset has no split {ref.split!r} (it has {', '.join(splits)})")
    with _open_lock:
        table = _audio_table(ref.location, ref.split, ref.column)
    if ref.row >= table.num_rows:
        raise AudioError(f"the split has {table.num_rows} examples, not row {ref.row}")
    return table[ref.row][ref.column] or {}


def row_has_audio(text: str) -> bool:
    """Whether the example a reference names holds audio (bytes, or an existing file)."""
    try:
        value = row_audio(text)
    except AudioError:
        return False
    return bool(value.get("bytes")) or bool(value.get("path") and os.path.isfile(value["path"]))


def read_row_audio(text: str) -> tuple[np.ndarray, int]:
    """One example's audio as it is: (samples, channels) float32 and its own rate in Hz.

    Raises AudioError for an example holding no audio or audio soundfile cannot decode.
    """
    value = row_audio(text)
    data, path = value.get("bytes"), value.get("path")
    if not data:
        if path and os.path.isfile(path):
            return read_audio(path)
        raise AudioError(f"the example holds no audio (no bytes{f', and no file {path}' if path else ''})")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AudioError(f"not readable audio ({first}); soundfile decodes WAV, FLAC and OGG") from e
    return samples, rate
