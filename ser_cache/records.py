"""Utterance records: the typed rows every stage after corpus preparation works on.

A corpus recipe (the `corpora` package) turns a raw folder into a list of `Utterance`s. The
list is saved beside the cache as JSON Lines (`records.jsonl`), and its hash goes into the
cache's settings so that a cache is never extended with a different corpus by accident.

Besides its class label an utterance may carry numeric targets (dimensional ratings such as
arousal and valence). A record without targets is written, read and hashed exactly as before
targets existed, so caches made earlier keep their fingerprint.

The hash does not depend on where the corpus lies: it covers ids, labels, speakers, groups and
targets, never paths, so a corpus moved elsewhere (and its manifest pointed there with
`--audio-root`) resumes its cache. What the audio files hold is checked apart from the hash, by
each file's size in bytes (`changed_audio`): putting sizes into the hash would have changed
the fingerprint of every cache made before sizes were recorded.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Mapping

from .errors import UserError


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
    targets: numeric targets as (name, value) pairs sorted by name, for example
        (("arousal", 4.2), ("valence", 3.0)); empty when the corpus has none. A mapping may be
        passed instead; it is stored as sorted pairs so that records stay immutable, hashable
        and equal whatever the order the targets were given in. `dict(r.targets)` reads them.
    listed_path: the path as the corpus's manifest writes it ("/data/x/a.wav", "a/b.wav"),
        before it is resolved into `path`; "" for corpora found by scanning a folder.
    size: bytes of the audio file when the corpus was prepared; 0 when not recorded (records
        made before sizes were, or a file that does not exist).
    source: for an augmented view (augment.py), the id of the utterance it was made from, whose
        audio file, label, speaker, group and targets it shares; "" for an utterance of the corpus.
    view: for an augmented view, what was done to its source's audio ("speed0.9", "noise20");
        "" for an utterance of the corpus.
    """

    id: str
    path: str
    label: str
    speaker: str
    group: str = ""
    duration: float = 0.0
    original_label: str = ""
    targets: tuple[tuple[str, float], ...] = ()
    listed_path: str = ""
    size: int = 0
    source: str = ""
    view: str = ""

    def __post_init__(self):
        items = list(self.targets.items() if isinstance(self.targets, Mapping) else self.targets)
        pairs = tuple(sorted((str(name), float(value)) for name, value in items))
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise RecordsError(f"utterance {self.id!r} names a target twice: {names}")
        object.__setattr__(self, "targets", pairs)


class RecordsError(UserError, ValueError):
    """Bad corpus metadata; the message names the row and the fix."""


MAX_LISTED = 5  # offending files named in an error message; the rest are counted


def listing(items: list, limit: int = MAX_LISTED) -> str:
    """The first few items and how many more, for an error message."""
    shown = ", ".join(str(i) for i in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


def validate(records: list[Utterance]) -> None:
    """Refuse records that later stages could not use honestly.

    Checks, in order: not empty; ids unique; no empty id, path, label or speaker; targets
    finite, and the same target names on every record (a regression target missing from some
    utterances would be a silent hole in the training data).
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
        for name, value in r.targets:
            if not math.isfinite(value):
                raise RecordsError(f"utterance {r.id!r} has target {name} = {value}: give it a "
                                   "finite number or leave the utterance out")
    names = target_names(records[:1])
    for r in records:
        if target_names([r]) != names:
            raise RecordsError(
                f"utterance {r.id!r} has targets {target_names([r])} but {records[0].id!r} has "
                f"{names}: every utterance of a corpus needs the same targets"
            )


def class_counts(records: Iterable[Utterance]) -> dict[str, int]:
    """Number of utterances per label, labels sorted by name."""
    return dict(sorted(Counter(r.label for r in records).items()))


def target_names(records: Iterable[Utterance]) -> list[str]:
    """The sorted names of the numeric targets the records carry (empty when none has any)."""
    return sorted({name for r in records for name, _ in r.targets})


def records_hash(records: Iterable[Utterance]) -> str:
    """SHA-256 over the fields that decide what a cache holds (not durations, paths or sizes).

    Paths are left out on purpose: moving a corpus folder must not invalidate its cache.
    Sizes are left out so that caches made before sizes were recorded keep their hash; they
    are compared by `changed_audio` instead.
    Targets enter the hash only when a record has some, so the hash of records without
    targets is the one they had before targets existed (existing caches stay valid), while
    the same corpus with other targets never reuses a cache.
    """
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.id):
        fields_ = [r.id, r.label, r.speaker, r.group]
        if r.targets:
            fields_.append([[name, value] for name, value in r.targets])
        h.update(json.dumps(fields_).encode())
        h.update(b"\n")
    return h.hexdigest()


def changed_audio(before: Iterable[Utterance], now: Iterable[Utterance]) -> list[str]:
    """The ids of `now` whose audio file's size in bytes differs from `before`'s.

    Only ids in both lists with a size recorded on both sides are compared, so records made
    before sizes were recorded (size 0) never count as changed.
    """
    sizes = {r.id: r.size for r in before if r.size}
    return [r.id for r in now if r.size and sizes.get(r.id, r.size) != r.size]


def refuse_changed_audio(before: list[Utterance], now: list[Utterance], cache_dir: Path) -> None:
    """RecordsError when the audio of `now` is not the audio the cache in `cache_dir` was made
    from (some file has another size): a corpus moved to the wrong copy, or re-encoded."""
    changed = changed_audio(before, now)
    if changed:
        r = next(r for r in now if r.id == changed[0])
        then = next(b.size for b in before if b.id == r.id)
        raise RecordsError(
            f"{len(changed)} audio files differ from those the cache {cache_dir} was made from, "
            f"for example {r.id!r}: {then} bytes then, {r.size} bytes now ({r.path}); point "
            "--audio-root (or DATA_DIR) at the copy the cache was made from, or pass a new "
            "--out folder to encode this audio"
        )


# Fields written only when they hold something, so that records.jsonl of a corpus without
# them reads (and is written) as it always did.
OPTIONAL_FIELDS = {"targets": (), "listed_path": "", "size": 0, "source": "", "view": ""}


def _row(r: Utterance) -> dict:
    """The JSON object of one record: targets as {name: value}; targets, listed_path, size,
    source and view left out when they hold nothing (OPTIONAL_FIELDS)."""
    row = asdict(r)
    row["targets"] = dict(r.targets)
    for name, empty in OPTIONAL_FIELDS.items():
        if getattr(r, name) == empty:
            del row[name]
    return row


def save_records(records: Iterable[Utterance], path: Path) -> None:
    """Write records as JSON Lines (one object per utterance), atomically."""
    path = Path(path)
    # A per-process temporary name: several `--shard I/N` jobs may write the same file at once.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_row(r), ensure_ascii=False) + "\n")
    tmp.replace(path)


def load_records(path: Path) -> list[Utterance]:
    """Read records written by `save_records` (also those written before targets existed)."""
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
