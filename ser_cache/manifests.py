"""Manifests as users write them: a CSV or JSON Lines file listing audio, label and speaker.

    corpora.prepare("csv", ...) --read_manifest_records--> list[Utterance] (before the label map)

A manifest is a CSV (UTF-8, a BOM is fine), or JSON Lines when its name ends in .jsonl (one
object per line, the columns as keys; column names and keys are compared ignoring case). Its
fields are path, label, speaker and optionally id and group; `--columns
path=file,label=emotion,speaker=spk_id` reads them from columns of other names. Every other
column holding numbers becomes a target of its name.

Paths may be absolute; relative ones start from the audio root (`--audio-root`, default the
manifest's folder). Symlinks are followed. The id defaults to the path under the audio root
without its extension ("a/b.wav" -> "a/b"), so ids, and the cache's identity, do not depend on
where the corpus lies. Records keep the path as listed (`listed_path`) beside the resolved one
(`path`). The layout and every refusal are described for users in docs/corpora.md and in the
docstring of corpora/listed.py.

The pieces (reading a file into a `Manifest`, the audio root, targets, repeated rows) are also
used by other readers of listed audio (emobox.py, hfdatasets.py).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .audio import audio_duration
from .records import RecordsError, Utterance

log = logging.getLogger(__name__)

CSV_NAME = "utterances.csv"  # looked for in CORPUS_DIR when no --csv is given


def as_number(cell: str) -> float | None:
    """The cell as a float, or None when it does not read as a number ("3,5" does not)."""
    try:
        return float(cell)
    except ValueError:
        return None


MANIFEST_FIELDS = ("path", "label", "speaker", "id", "group")  # the fields --columns may map
REQUIRED_FIELDS = ("path", "label", "speaker")
JSONL_SUFFIX = ".jsonl"  # a manifest with this suffix is JSON Lines, any other is a CSV
COLUMNS_EXAMPLE = "--columns path=file,label=emotion,speaker=spk_id"


@dataclass
class Manifest:
    """A manifest file as read, before its cells are checked.

    columns: the column names (CSV header cells or JSON keys), lower-cased, in file order.
    rows: (number, column -> cell stripped of spaces), the number being the CSV row (the
    header is row 1), the JSONL line, or a dataset example's 0-based index in its split
    (hfdatasets.py). unit: "row", "line" or "example", for messages.
    """

    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]
    unit: str

    def at(self, n: int) -> str:
        """Where row (or line) n is, for a message: "x.csv, row 3"."""
        return f"{self.path}, {self.unit} {n}"

    @property
    def header(self) -> str:
        """Where the column names are, for a message."""
        return f"{self.path}, row 1" if self.unit == "row" else str(self.path)

    @property
    def rule(self) -> str:
        """Where the fields must be, for a message."""
        return {"row": "the first row must name the columns",
                "line": "every object must have the keys"}.get(self.unit, "the dataset must have the columns")

    @property
    def has(self) -> str:
        """"the manifest's columns are a, b, c", for a message."""
        return f"the manifest's columns are {', '.join(self.columns) or 'none'}"


def find_manifest(corpus_dir: Path, csv_path: Path | None) -> Path:
    """The manifest to read: `csv_path`, else `corpus_dir` when it is a file, else CSV_NAME in it."""
    if csv_path is None:
        corpus_dir = Path(corpus_dir).expanduser()
        csv_path = corpus_dir if corpus_dir.is_file() else corpus_dir / CSV_NAME
    csv_path = Path(csv_path).expanduser().absolute()
    if not csv_path.is_file():
        kind = "JSONL file" if csv_path.suffix.lower() == JSONL_SUFFIX else "CSV file"
        raise RecordsError(f"{kind} {csv_path} does not exist: pass --csv PATH, or put "
                           f"{CSV_NAME} (columns {', '.join(REQUIRED_FIELDS)}) in the corpus folder")
    return csv_path


def read_csv(path: Path) -> Manifest:
    """A CSV manifest (UTF-8, a BOM is fine); blank lines are skipped, short rows padded."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        twice = sorted({h for h in header if h and header.count(h) > 1})
        if twice:
            raise RecordsError(f"{path}, row 1: column(s) {', '.join(twice)} named twice: "
                               "give every column its own name")
        rows = []
        for n, cells in enumerate(reader, 2):
            if not any(c.strip() for c in cells):
                continue  # a blank line is not a row
            if len(cells) > len(header):
                raise RecordsError(f"{path}, row {n}: {len(cells)} fields but the header names "
                                   f"{len(header)}: quote fields that contain commas")
            rows.append((n, {k: v.strip() for k, v in zip(header, cells)}))
    return Manifest(path, header, rows, "row")


class _Pairs(list):
    """A JSON object as its (key, value) pairs, so that a key given twice is seen."""


def json_cell(value) -> str:
    """A JSON value as a manifest cell: strings stripped, null empty, anything else as JSON
    text (4.5 -> "4.5", true -> "true")."""
    if isinstance(value, str):
        return value.strip()
    return "" if value is None else json.dumps(value)


def read_jsonl(path: Path) -> Manifest:
    """A JSON Lines manifest: one object per line, its keys the columns; blank lines skipped."""
    columns, rows = [], []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pairs = json.loads(line, object_pairs_hook=_Pairs)
            except json.JSONDecodeError as e:
                raise RecordsError(f"{path}, line {n}: not JSON ({e.msg}, column {e.colno}): "
                                   "write one JSON object per line") from None
            if not isinstance(pairs, _Pairs):
                raise RecordsError(f"{path}, line {n}: {line.strip()[:40]!r} is not a JSON object: "
                                   'write one object per line, e.g. {"path": "a.wav", "label": '
                                   '"angry", "speaker": "s1"}')
            cells = {}
            for key, value in pairs:
                name = key.strip().lower()
                if name in cells:
                    raise RecordsError(f"{path}, line {n}: key {name!r} given twice (keys are "
                                       "compared ignoring case): give every key its own name")
                cells[name] = json_cell(value)
                if name not in columns:
                    columns.append(name)
            rows.append((n, cells))
    if not rows:
        raise RecordsError(f"{path} holds no JSON objects: write one per utterance, one per line")
    return Manifest(path, columns, rows, "line")


def read_manifest(path: Path) -> Manifest:
    """The manifest at `path`: JSON Lines when its name ends in .jsonl, else a CSV."""
    return read_jsonl(path) if path.suffix.lower() == JSONL_SUFFIX else read_csv(path)


def parse_columns(spec: str | None, manifest: Manifest) -> dict[str, str]:
    """{field: column} from --columns "path=file,label=emotion"; RecordsError naming the
    manifest's columns for a malformed item, an unknown field or a field mapped twice."""
    mapping = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        field_, eq, column = (s.strip().lower() for s in item.partition("="))
        if not (eq and field_ and column):
            raise RecordsError(f"--columns {spec!r}: {item.strip()!r} is not FIELD=COLUMN: write "
                               f"e.g. {COLUMNS_EXAMPLE} ({manifest.has})")
        if field_ not in MANIFEST_FIELDS:
            raise RecordsError(f"--columns {spec!r}: unknown field {field_!r}; the fields are "
                               f"{', '.join(MANIFEST_FIELDS)} ({manifest.has})")
        if field_ in mapping:
            raise RecordsError(f"--columns {spec!r}: field {field_!r} is mapped twice: map it "
                               f"once ({manifest.has})")
        mapping[field_] = column
    return mapping


def manifest_fields(spec: str | None, manifest: Manifest,
                    defaults: dict[str, str] | None = None) -> dict[str, str]:
    """{field: the manifest's column holding it} for every field the manifest has.

    A field not mapped by --columns is read from `defaults`' column for it, else from the
    column of its own name. RecordsError, naming the manifest's columns, when a required
    field's column or a mapped one is absent.
    """
    mapping = parse_columns(spec, manifest)
    fields_ = {f: mapping.get(f, (defaults or {}).get(f, f)) for f in MANIFEST_FIELDS}
    absent = [f for f in MANIFEST_FIELDS
              if (f in REQUIRED_FIELDS or f in mapping) and fields_[f] not in manifest.columns]
    if absent:
        names = ", ".join(fields_[f] + (f" (for {f})" if f in mapping else "") for f in absent)
        raise RecordsError(
            f"{manifest.header}: missing column(s) {names} ({manifest.has}): {manifest.rule} "
            f"{', '.join(REQUIRED_FIELDS)} (optionally id, group and numeric targets), or "
            f"map yours to them with {COLUMNS_EXAMPLE}"
        )
    return {f: c for f, c in fields_.items() if c in manifest.columns}


def manifest_targets(manifest: Manifest, used: Iterable[str]) -> list[str]:
    """The columns, beyond those `used` for fields, whose cells become targets.

    A column with at least one number in it is a target column, and then every one of its
    cells must be a finite number: an empty cell, a typo ("3,5") or "nan" is refused, naming
    the row, rather than dropping the utterance or guessing a value. A column without any
    number (a transcript, a gender), or named like a field that --columns reads from another
    column, is ignored, with a logged note naming it.
    """
    targets, ignored = [], []
    unused = [col for col in manifest.columns if col in MANIFEST_FIELDS and col not in used]
    if unused:
        log.warning("%s: column(s) %s are ignored: --columns reads those fields from other "
                    "columns", manifest.path, ", ".join(unused))
    for i, col in enumerate(manifest.columns):
        if col in used or col in unused:
            continue
        cells = [(n, row.get(col, "")) for n, row in manifest.rows]
        if not any(as_number(v) is not None for _, v in cells):
            ignored.append(col or f"(unnamed column {i + 1})")
            continue
        if not col:
            raise RecordsError(f"{manifest.header}: column {i + 1} holds numbers but has no "
                               "name: name it in the header (it becomes a target of that name)")
        for n, v in cells:
            value = as_number(v)
            if value is None or not math.isfinite(value):
                what = "is empty" if not v else f"is {v!r}, not a finite number"
                raise RecordsError(
                    f"{manifest.at(n)}, column {col!r}: the cell {what}; every cell of a "
                    "numeric column is a target value: fill it in (a dot as decimal separator), "
                    f"delete the {manifest.unit}, or remove the column"
                )
        targets.append(col)
    if ignored:
        log.warning("%s: column(s) %s hold no numbers and are ignored; only numeric columns "
                    "besides the fields %s become targets", manifest.path, ", ".join(ignored),
                    ", ".join(MANIFEST_FIELDS))
    return targets


def audio_folder(audio_root: Path | None, manifest_path: Path) -> Path:
    """The folder relative paths start from: `audio_root`, or the manifest's folder; absolute,
    with "." and ".." removed (symlinks are kept as written)."""
    if audio_root is None:
        return Path(os.path.normpath(manifest_path.parent))
    root = Path(audio_root).expanduser().absolute()
    if not root.is_dir():
        raise RecordsError(f"audio root {root} is not a folder: pass --audio-root the folder the "
                           "manifest's relative paths start from")
    return Path(os.path.normpath(root))


def path_under(listed: str, root: Path) -> str | None:
    """The listed path relative to `root`, written with "/" ("a/b.wav"), or None when it lies
    outside root. Read from the names alone: a symlink under root is under it wherever it
    points, so ids do not depend on where the audio really is."""
    rel = os.path.relpath(os.path.normpath(os.path.join(root, listed)), root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return rel.replace(os.sep, "/")


def refuse_outside(manifest: Manifest, path_column: str, root: Path, default_root: bool) -> None:
    """RecordsError when a listed path lies outside the audio root (its id would depend on
    where the corpus is), suggesting the folder that holds all the audio."""
    listed = [(n, row.get(path_column, "")) for n, row in manifest.rows]
    listed = [(n, p) for n, p in listed if p]  # an empty path is refused row by row
    outside = [(n, p) for n, p in listed if path_under(p, root) is None]
    if not outside:
        return
    n, first = outside[0]
    holder = os.path.commonpath([os.path.dirname(os.path.normpath(os.path.join(root, p)))
                                 for _, p in listed])
    more = f" (and {len(outside) - 1} more {manifest.unit}s)" if len(outside) > 1 else ""
    which = "the manifest's folder" if default_root else "--audio-root"
    raise RecordsError(
        f"{manifest.at(n)}: path {first!r} points outside the audio root {root} ({which}){more}, "
        f"so no id can be made from it: pass --audio-root {holder} (the folder that holds all "
        f"the audio), put the audio under the audio root, or give every {manifest.unit} an id "
        "(--columns id=COLUMN)"
    )


def refuse_empty(cells: dict[str, str], n: int, manifest: Manifest, fields_: dict[str, str],
                 required: Iterable[str]) -> None:
    """RecordsError naming row n's first empty field among `required` (and id, when read)."""
    for name in tuple(required) + (("id",) if "id" in fields_ else ()):
        if not cells.get(fields_[name]):
            column = f" (column {fields_[name]!r})" if fields_[name] != name else ""
            raise RecordsError(f"{manifest.at(n)}: the {name} field{column} is empty: fill it in "
                               f"or delete the {manifest.unit}")


def manifest_record(cells: dict[str, str], n: int, manifest: Manifest, fields_: dict[str, str],
                    root: Path, targets: list[str]) -> Utterance:
    """One row of a manifest -> an Utterance (its size is filled in by `prepare`).

    fields_: field -> column (`manifest_fields`); targets: the target columns (checked numeric).
    The id is the id column's, else the path under the audio root without its extension.
    """
    refuse_empty(cells, n, manifest, fields_, REQUIRED_FIELDS)
    listed = cells[fields_["path"]]
    path = (root / listed).resolve()  # symlinks followed: the file the extractor will read
    if path.is_dir():
        raise RecordsError(f"{manifest.at(n)}: path {listed!r} is a folder ({path}), not an audio "
                           "file: list one file per row")
    uid = cells[fields_["id"]] if "id" in fields_ else posixpath.splitext(path_under(listed, root))[0]
    label = cells[fields_["label"]]
    return Utterance(
        id=uid, path=str(path), label=label, speaker=cells[fields_["speaker"]],
        group=cells.get(fields_.get("group"), ""),
        duration=audio_duration(path) if path.exists() else 0.0,  # missing: named by the summary
        original_label=label, targets={t: float(cells[t]) for t in targets}, listed_path=listed,
    )


def refuse_repeats(records: list[Utterance], numbers: list[int], manifest: Manifest) -> None:
    """RecordsError for two rows with the same id, or listing the same audio file.

    numbers: the row (or line) number of each record, for the message.
    """
    checks = {
        "have the same id": ([r.id for r in records], "ids must be unique; give each "
                             f"{manifest.unit} its own path or id"),
        "list the same audio file": ([r.path for r in records], "list each file once (whole "
                                     "files are encoded; segments of a file are not supported)"),
    }
    for what, (keys, fix) in checks.items():
        first = {}
        for key, n in zip(keys, numbers):
            if key in first:
                raise RecordsError(f"{manifest.path}, {manifest.unit}s {first[key]} and {n} "
                                   f"{what} {key!r}: {fix}")
            first[key] = n


def refuse_none_exist(records: list[Utterance], numbers: list[int], manifest: Manifest,
                      root: Path) -> None:
    """RecordsError when not one listed file exists: the audio root is wrong, or the paths."""
    if not any(os.path.exists(r.path) for r in records):
        n, r = numbers[0], records[0]
        raise RecordsError(
            f"none of the {len(records)} audio files {manifest.path} lists exists, for example "
            f"{manifest.unit} {n}: {r.listed_path!r} (looked for {r.path}): pass --audio-root the "
            f"folder the relative paths start from (now {root}), or fix the paths"
        )


def read_manifest_records(corpus_dir: Path, csv_path: Path | None = None,
                          audio_root: Path | None = None,
                          columns: str | None = None) -> list[Utterance]:
    """The records a manifest lists (CSV, or JSON Lines by suffix) with the fields path, label,
    speaker[, id][, group][, numeric targets...], named as --columns maps them; no label map
    applied. The manifest is `csv_path`, else `corpus_dir` when it is a file, else CSV_NAME in it."""
    manifest = read_manifest(find_manifest(corpus_dir, csv_path))
    fields_ = manifest_fields(columns, manifest)
    if not manifest.rows:
        raise RecordsError(f"{manifest.path} has a header but no rows: add one row per utterance")
    root = audio_folder(audio_root, manifest.path)
    if "id" not in fields_:
        refuse_outside(manifest, fields_["path"], root, default_root=audio_root is None)
    targets = manifest_targets(manifest, fields_.values())
    records = [manifest_record(cells, n, manifest, fields_, root, targets)
               for n, cells in manifest.rows]
    numbers = [n for n, _ in manifest.rows]
    refuse_repeats(records, numbers, manifest)
    refuse_none_exist(records, numbers, manifest, root)
    return records
