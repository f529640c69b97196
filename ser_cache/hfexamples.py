"""Examples of a Hugging Face audio dataset as audio sources: a reference to one example, the
dataset it names opened once per process, and the example's encoded audio.

    "hf:<location>?split=<split>&row=<row>&column=<audio column>" --row_audio--> {"bytes", "path"}

A record read from a dataset (hfdatasets.py) has such a reference as its path; audio.read_audio
decodes what `row_audio` returns like any file. location: the dataset's absolute path, or its
hub id. Where a dataset may be (a save_to_disk folder, .parquet or .arrow files, a hub id) is
described in hfdatasets.py.

Audio is read undecoded (`Audio(decode=False)`: the encoded file's bytes, or a path to it):
datasets' own decoding needs torchcodec and ffmpeg, which this tool does not require, and would
resample to the feature's rate first, a second, needless resampling.

A reference that names no example (no such split or row, a dataset that cannot be opened) is
a RecordsError: the record it came from no longer fits the dataset.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from .records import RecordsError

DATASET_REF_PREFIX = "hf:"  # a path naming a dataset example (RowRef), not a file
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes into its folder
DATA_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}  # file suffix -> datasets' builder
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "owner/name" (or a canonical "name")
SINGLE_SPLIT = "train"  # the split of a dataset saved without one, as load_dataset names it


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
        """The reference `str(ref)` wrote; RecordsError when `text` is not one."""
        location, _, query = text[len(DATASET_REF_PREFIX):].rpartition("?")
        values = {k: v[0] for k, v in parse_qs(query).items()}
        if not (text.startswith(DATASET_REF_PREFIX) and location and {"split", "row", "column"} <= set(values)
                and values["row"].isdigit()):
            raise RecordsError(f"not a dataset example reference ({DATASET_REF_PREFIX}LOCATION?split=S&row=N&column=C)")
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


def audio_columns(ds) -> list[str]:
    """The names of the columns whose feature is Audio."""
    from datasets import Audio

    return [name for name, feature in ds.features.items() if isinstance(feature, Audio)]


def undecoded(ds, column: str):
    """`ds` reduced to `column`, whose audio reads as {"bytes", "path"} instead of decoded."""
    from datasets import Audio

    ds = ds.select_columns([column])
    return ds.cast_column(column, Audio(decode=False)) if column in audio_columns(ds) else ds


# --- one example's audio -------------------------------------------------------------------------

@lru_cache(maxsize=32)
def _audio_table(location: str, split: str, column: str):
    return undecoded(open_splits(location)[split], column)


def row_audio(text: str) -> dict:
    """{"bytes", "path"} of the example a reference names (either may be empty); RecordsError
    when the reference names no example."""
    ref = RowRef.parse(text)
    try:
        splits = open_splits(ref.location)
    except RecordsError as e:
        raise RecordsError(f"the dataset cannot be opened: {e}") from None
    if ref.split not in splits:
        raise RecordsError(f"the dataset has no split {ref.split!r} (it has {', '.join(splits)})")
    with _open_lock:
        table = _audio_table(ref.location, ref.split, ref.column)
    if ref.row >= table.num_rows:
        raise RecordsError(f"the split has {table.num_rows} examples, not row {ref.row}")
    return table[ref.row][ref.column] or {}


def row_has_audio(text: str) -> bool:
    """Whether the example a reference names holds audio (bytes, or an existing file)."""
    try:
        value = row_audio(text)
    except RecordsError:
        return False
    return bool(value.get("bytes")) or bool(value.get("path") and os.path.isfile(value["path"]))
