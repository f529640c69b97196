"""What every corpus recipe is made of, and the steps recipes share.

A recipe (`Recipe`) names a corpus, its `prepare` function (corpus folder -> records), where
its public release comes from (`Release`), its label maps and the options it reads. The
helpers below are the steps the folder-scanning recipes have in common: finding the corpus
folder and its audio, refusing files that do not follow the naming scheme, and reading label
and speaker from file names (`SpeakerRule`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ..audio import audio_duration
from ..records import RecordsError, Utterance, listing

AUDIO_SUFFIXES = (".wav", ".flac")

# The options only some corpora read: prepare's keyword -> the command-line option, for messages.
OPTION_FLAGS = {
    "csv_path": "--csv",
    "audio_root": "--audio-root",
    "columns": "--columns",
    "speaker_pattern": "--speaker-pattern",
}


@dataclass(frozen=True)
class Release:
    """Where a public corpus comes from and how its checksum list lines up with the unpacked tree.

    archives: (file name, url) of each release archive; empty when it cannot be downloaded.
    checksums: file name of its list in download.CHECKSUM_DIR, or None when none is shipped.
    subfolder: of the unpacked tree, that the list's paths are relative to (EmoDB's wav/). The
        folder to pass to `ser-cache extract` is the one above it, as the corpus recipes expect.
    """

    archives: tuple[tuple[str, str], ...] = ()
    checksums: str | None = None
    subfolder: str = "."


@dataclass(frozen=True)
class Recipe:
    """One corpus that `prepare` reads.

    prepare: (corpus_dir, **options) -> the corpus's records before any label map.
    release: where the public release is downloaded from and checked against; None when there
        is no public release (or the corpus is any manifest).
    default_label_map: the label map applied when none is named; None keeps every label.
    label_maps: the named maps (original label -> class) this corpus brings into LABEL_MAPS;
        one may fit other corpora too, as their keys are decoded class names.
    options: the keywords of `prepare` beyond corpus_dir (keys of OPTION_FLAGS).
    describe_source: (corpus_dir, records, **options) -> what the cache's provenance records of
        where the records came from beyond the folder (the manifest read, ...); None: nothing.
    """

    name: str
    prepare: Callable[..., list[Utterance]]
    release: Release | None = None
    default_label_map: str | None = None
    label_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    describe_source: Callable[..., dict] | None = None

    def __post_init__(self):
        unknown = set(self.options) - set(OPTION_FLAGS)
        assert not unknown, f"recipe {self.name}: options {sorted(unknown)} are not in OPTION_FLAGS"


@dataclass(frozen=True)
class SpeakerRule:
    """How a corpus's file names say who speaks: a file stem that fully matches `pattern` ->
    `speaker(match)`. scheme: the rule in words, for messages ("03a01Fa -> 03")."""

    pattern: re.Pattern
    speaker: Callable[[re.Match], str]
    scheme: str

    def __call__(self, stem: str) -> str | None:
        """The speaker of a file stem, None when the stem does not follow the rule."""
        m = self.pattern.fullmatch(stem)
        return self.speaker(m) if m else None


def corpus_folder(corpus_dir: Path, corpus: str, layout: str) -> Path:
    """The corpus folder as an absolute path, or RecordsError when it is not a folder."""
    corpus_dir = Path(corpus_dir).expanduser().absolute()
    if not corpus_dir.is_dir():
        raise RecordsError(
            f"{corpus} corpus folder {corpus_dir} does not exist (or is not a folder): "
            f"pass the folder that holds {layout}"
        )
    return corpus_dir


def find_audio(folder: Path, corpus: str, layout: str) -> list[Path]:
    """Every .wav/.flac file under `folder`, sorted; RecordsError when there are none."""
    # os.walk with followlinks: corpora are often assembled from symlinked folders, which
    # Path.rglob does not enter.
    files = sorted(
        Path(root) / name
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
        if Path(name).suffix.lower() in AUDIO_SUFFIXES and not name.startswith(".")
        and (Path(root) / name).is_file()
    )
    if not files:
        raise RecordsError(
            f"no audio files (.wav or .flac) found under {folder}: the {corpus} recipe "
            f"expects {layout}"
        )
    return files


def refuse_unmatched(bad: list[Path], corpus: str, scheme: str) -> None:
    """RecordsError naming the files whose names do not follow the corpus's naming scheme."""
    if bad:
        raise RecordsError(
            f"{len(bad)} {corpus} files do not follow its naming scheme {scheme}: "
            f"{listing(bad)}; rename or move them out of the corpus folder"
        )


def records_from_names(corpus_dir: Path, corpus: str, layout: str, scheme: str, speakers: SpeakerRule,
                       label_of: Callable[[re.Match], str]) -> list[Utterance]:
    """Records of a corpus that spells label and speaker in its file names: id = file stem.

    A file stem that fully matches `speakers.pattern` gives the label `label_of(match)` and the
    speaker `speakers.speaker(match)`; files that do not match are refused together, with
    `scheme` in the message.
    """
    corpus_dir = corpus_folder(corpus_dir, corpus, layout)
    records, bad = [], []
    for path in find_audio(corpus_dir, corpus, layout):
        m = speakers.pattern.fullmatch(path.stem)
        if not m:
            bad.append(path)
            continue
        label = label_of(m)
        records.append(Utterance(
            id=path.stem, path=str(path), label=label, speaker=speakers.speaker(m),
            duration=audio_duration(path), original_label=label,
        ))
    refuse_unmatched(bad, corpus, scheme)
    return records
