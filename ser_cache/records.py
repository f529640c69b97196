"""Utterance records: the typed rows every stage after corpus preparation works on.

A corpus preparer (see `corpora.py`) turns a raw folder into a list of `Utterance`s. The list
is saved beside the cache as JSON Lines (`records.jsonl`), and its hash goes into the cache's
settings so that a cache is never extended with a different corpus by accident.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Utterance:
    """One labelled utterance of a corpus.

    id: unique within the corpus, stable across runs (used as the cache key).
    path: absolute path of the audio file.
    label: the class name after the corpus's label map (for example "angry").
    speaker: speaker id; folds never put one speaker on both sides.
    group: a coarser unit of speakers (an IEMOCAP session), or "" when the corpus has none.
    duration: seconds, read from the file header (0.0 when the header could not be read).
    original_label: the label as the corpus spells it, before mapping.
    """

    id: str
    path: str
    label: str
    speaker: str
    group: str = ""
    duration: float = 0.0
    original_label: str = ""


class RecordsError(ValueError):
    """Bad corpus metadata; the message names the row and the fix."""


def validate(records: list[Utterance]) -> None:
    """Refuse records that later stages could not use honestly.

    Checks, in order: not empty; ids unique; no empty id, path, label or speaker.
    Raises RecordsError naming the first offending rows.
    """
    if not records:
        raise RecordsError("the corpus has no utterances: check DATA_DIR and --corpus")
    counts = Counter(r.id for r in records)
    dupes = [i for i, n in counts.items() if n > 1]
    if dupes:
        paths = [r.path for r in records if r.id == dupes[0]]
        raise RecordsError(
            f"{len(dupes)} duplicate utterance ids, for example {dupes[0]!r} at {paths}; "
            "ids must be unique: rename the files or give each CSV row its own path"
        )
    for r in records:
        for name in ("id", "path", "label", "speaker"):
            if not str(getattr(r, name)).strip():
                raise RecordsError(f"utterance {r.id or r.path!r} has an empty {name}: fill it in")


def class_counts(records: Iterable[Utterance]) -> dict[str, int]:
    """Number of utterances per label, labels sorted by name."""
    return dict(sorted(Counter(r.label for r in records).items()))


def labels_of(records: Iterable[Utterance]) -> list[str]:
    """The sorted class names; the index of a name is its class number everywhere."""
    return sorted({r.label for r in records})


def records_hash(records: Iterable[Utterance]) -> str:
    """SHA-256 over the fields that decide what a cache holds (not durations or paths).

    Paths are left out on purpose: moving a corpus folder must not invalidate its cache.
    """
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.id):
        h.update(json.dumps([r.id, r.label, r.speaker, r.group]).encode())
        h.update(b"\n")
    return h.hexdigest()


def save_records(records: Iterable[Utterance], path: Path) -> None:
    """Write records as JSON Lines (one object per utterance), atomically."""
    path = Path(path)
    # A per-process temporary name: several `--shard I/N` jobs may write the same file at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")
    tmp.replace(path)


def load_records(path: Path) -> list[Utterance]:
    """Read records written by `save_records`."""
    names = {f.name for f in fields(Utterance)}
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            unknown = set(row) - names
            if unknown:
                raise RecordsError(f"{path}:{n}: unknown fields {sorted(unknown)}")
            out.append(Utterance(**row))
    return out
