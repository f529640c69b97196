"""Preparing a corpus for the command line: run its recipe, apply the label map, validate,
summarise, and record where the records came from.

    prepare(corpus, corpus_dir, label_map, **options) --> PreparedCorpus(records, dropped, source, ...)
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ..audio import audio_exists
from ..records import RecordsError, Utterance, class_counts, listing, target_names, validate
from .base import OPTION_FLAGS
from .labels import NO_MAP, map_labels, resolve_label_map
from .registry import CORPORA


def single_speaker_labels(records: Iterable[Utterance]) -> dict[str, str]:
    """Label -> its only speaker, for every label spoken by one speaker alone."""
    speakers = defaultdict(set)
    for r in records:
        speakers[r.label].add(r.speaker)
    return {label: next(iter(s)) for label, s in sorted(speakers.items()) if len(s) == 1}


def single_speaker_warnings(records: Iterable[Utterance]) -> list[str]:
    """One warning line per label spoken by one speaker alone.

    A warning, not an error: such a corpus (one actor's recordings, say) is still worth
    extracting; it is training, whose speaker-independent folds cannot test these labels,
    that refuses it (folds.py).
    """
    return [f"warning: label {label!r} has only speaker {speaker!r}: speaker-independent folds cannot "
            "test it (training will refuse it; extraction goes on)"
            for label, speaker in single_speaker_labels(records).items()]


@dataclass
class PreparedCorpus:
    """A prepared corpus: its records and what preparing it did.

    label_map: the name of the map applied, or None when every label was kept.
    dropped: original label -> utterances the label map dropped.
    """

    corpus: str
    corpus_dir: Path
    label_map: str | None
    records: list[Utterance]
    dropped: dict[str, int] = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # where the records come from (`corpus_source`)

    def summary(self, warnings: bool = True) -> str:
        """A few lines for the CLI: targets and their ranges, per-class counts after mapping,
        drops, and (unless `warnings` is False: check-corpus lists them as problems) warnings
        about missing or unreadable files and classes of one speaker."""
        rs = self.records
        speakers = {r.speaker for r in rs}
        groups = {r.group for r in rs if r.group}
        hours = sum(r.duration for r in rs) / 3600
        lines = [
            f"{self.corpus} ({self.corpus_dir}): {len(rs)} utterances, {len(speakers)} speakers"
            + (f", {len(groups)} groups" if groups else "")
            + f", {hours:.2f} h, label map {self.label_map or NO_MAP}"
        ]
        names = target_names(rs)
        if names:
            values = {name: [dict(r.targets)[name] for r in rs] for name in names}
            lines.append("targets " + ", ".join(
                f"{name} ({min(v):g} .. {max(v):g}, mean {sum(v) / len(v):.3g})"
                for name, v in values.items()))
        sources = defaultdict(Counter)
        for r in rs:
            sources[r.label][r.original_label] += 1
        for label, n in class_counts(rs).items():
            merged = sources[label]
            from_ = (" (" + " + ".join(f"{k} {v}" for k, v in sorted(merged.items())) + ")"
                     if len(merged) > 1 else "")
            lines.append(f"  {label:<12} {n:6d}{from_}")
        if self.dropped:
            lines.append(
                f"dropped {sum(self.dropped.values())} utterances whose original label is not "
                f"in label map {self.label_map}: "
                + ", ".join(f"{k} {n}" for k, n in self.dropped.items())
            )
        if not warnings:
            return "\n".join(lines)
        silent = [r for r in rs if r.duration <= 0]
        exists = {r.id: audio_exists(r.path) for r in silent}
        missing = [r.id for r in silent if not exists[r.id]]
        if missing:
            what, fix = (("examples hold no audio", "save the dataset with its audio embedded")
                         if self.corpus == "hf" else ("files do not exist", "fix their paths, or --audio-root"))
            lines.append(f"warning: {len(missing)} {what} (the extractor will skip and record "
                         f"them; {fix}): {listing(missing)}")
        unreadable = [r.id for r in silent if exists[r.id]]
        if unreadable:
            lines.append(f"warning: {len(unreadable)} files have no readable header (duration "
                         f"0.0; the extractor will skip them): {listing(unreadable)}")
        lines += single_speaker_warnings(rs)
        return "\n".join(lines)


def file_size(path: str) -> int:
    """Bytes of the file at `path` (symlinks followed); 0 when there is none."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def refuse_foreign_options(corpus: str, options: dict) -> None:
    """RecordsError for options that `corpus`'s recipe does not read, naming the corpora that do."""
    foreign = [k for k in options if k not in CORPORA[corpus].options]
    if not foreign:
        return
    given = ", ".join(OPTION_FLAGS[k] for k in foreign)
    readers = [name for name, r in CORPORA.items() if all(k in r.options for k in foreign)]
    if not readers:
        raise RecordsError(f"{given}: no corpus reads all of these, and {corpus!r} none: drop them")
    raise RecordsError(f"{given}: only read with corpus {' or '.join(repr(c) for c in readers)}, not "
                       f"{corpus!r}: drop {given} or use --corpus {' or '.join(readers)}")


def prepare(corpus: str, corpus_dir: Path, label_map: str | None = None,
            csv_path: Path | None = None, audio_root: Path | None = None,
            columns: str | None = None, speaker_pattern: str | None = None) -> PreparedCorpus:
    """Prepare `corpus` from `corpus_dir`: records after the label map, with each file's size,
    validated, summarised.

    label_map: a name in LABEL_MAPS, "none" to keep every label, or None for the corpus's
    default. csv_path: only for corpus "csv"; columns: for "csv" and "hf"; audio_root: for
    "csv" and "emobox"; speaker_pattern: only for "emobox" (each recipe's `options`).
    """
    if corpus not in CORPORA:
        raise RecordsError(f"unknown corpus {corpus!r}; known corpora: {', '.join(CORPORA)}")
    options = {k: v for k, v in dict(csv_path=csv_path, audio_root=audio_root, columns=columns,
                                     speaker_pattern=speaker_pattern).items() if v is not None}
    refuse_foreign_options(corpus, options)
    resolve_label_map(corpus, label_map)  # refuse an unknown map name before scanning the corpus
    everything = CORPORA[corpus].prepare(corpus_dir, **options)
    validate(everything)  # before the map: an id given twice is refused even if the map drops it
    name, records, dropped = map_labels(everything, corpus, label_map)
    records = [r if r.size else replace(r, size=file_size(r.path)) for r in records]  # hf: read with the audio
    source = corpus_source(corpus, corpus_dir, name, everything, options)
    return PreparedCorpus(corpus, Path(source["data"]), name, records, dropped, source)


def corpus_source(corpus: str, corpus_dir: Path, label_map: str | None, records: list[Utterance],
                  options: dict) -> dict:
    """Where a prepared corpus comes from, for the cache's provenance and `inspect`.

    data: DATA_DIR as an absolute path (a hub id for a hub dataset); what the recipe's
    `describe_source` adds (csv, emobox: the manifest read and the audio root relative paths
    started from; hf: the examples per split and the audio column(s)); columns: --columns as
    given (other fields come from columns of their own name); label_map; speaker_pattern
    (emobox) when given. records: the records before the label map. options: the corpus
    options given (prepare's keywords).
    """
    source = {"corpus": corpus, "data": str(Path(corpus_dir).expanduser().absolute())}
    describe = CORPORA[corpus].describe_source
    if describe is not None:
        source.update(describe(corpus_dir, records, **options))
    if options.get("columns"):
        source["columns"] = options["columns"]
    source["label_map"] = label_map or NO_MAP
    if options.get("speaker_pattern"):
        source["speaker_pattern"] = options["speaker_pattern"]
    return source


def source_text(source: dict) -> list[str]:
    """`corpus_source`'s dict as the lines `inspect` prints (empty for caches made before it
    was recorded)."""
    if not source:
        return []
    if source["corpus"] == "hf":
        splits = ", ".join(f"{name} {n}" for name, n in source["splits"].items())
        lines = [f"dataset {source['data']} (splits {splits}; audio column {', '.join(source['audio_columns'])})"]
    elif "manifest" in source:
        lines = [f"manifest {source['manifest']}", f"audio root {source['audio_root']}"]
    else:
        lines = [f"folder {source['data']}"]
    if "columns" in source:
        lines.append(f"columns {source['columns']} (other fields from columns of their own name)")
    if "speaker_pattern" in source:
        lines.append(f"speaker pattern {source['speaker_pattern']!r}")
    lines.append(f"label map {source['label_map']}")
    return lines
