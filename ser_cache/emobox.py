"""EmoBox metadata and folds: the partitions behind the EmoBox benchmark, read as published.

EmoBox (github.com/emo-box/EmoBox) describes each corpus it benchmarks in one folder:

    data/<dataset>/<dataset>.jsonl                      one JSON object per utterance
    data/<dataset>/label_map.json                       {"emo" value: class name}
    data/<dataset>/fold_K/<dataset>_train_fold_K.jsonl  the training utterances of fold K (1-based)
    data/<dataset>/fold_K/<dataset>_test_fold_K.jsonl   the test utterances of fold K

An utterance is `{"key": ..., "wav": "downloads/...", "emo": ..., "length": seconds, ...}`:
`key` becomes the id, `wav` the audio path (relative ones start from the audio root, by default
the jsonl's folder), `emo` decoded by label_map.json the label (the class name as EmoBox
spells it: "Angry", "Fear", "Surprise"; without a label_map.json, `emo` as written).
Keys that are EmoBox's bookkeeping (`length`, `num_frame`, `sample_rate`, `channel`, `type`,
`task`, `dataset`) are not targets: `length` is a duration, not an emotion rating. Any other
key holding numbers (the values of a dimensional set: `valence`, `arousal`, ...) becomes a
target of its name, checked as a manifest's target columns are (manifests.manifest_targets).

EmoBox lists no speakers. They are read from the file name (the `wav` stem) by the rule of
the dataset (the jsonl's name) among the rules the caller passes (the emobox recipe passes
those of the corpus recipes, and URDU's: corpora/listed.py), or by `--speaker-pattern REGEX`,
whose one group captures the speaker, searched in the file name without its extension (given,
it replaces the dataset's rule). A file whose speaker cannot be found is refused.

Folds (`fold_table`): fold_K becomes fold K-1. An utterance in no test file (EmoBox's
single train/test splits) is trained on in every fold and tested in none. A valid file
(`<dataset>_valid_fold_K.jsonl`), where there is one, counts as training: validation is always
carved from each fold's training speakers (folds.py), never taken from a list.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from .audio import audio_duration
from .manifests import (audio_folder, manifest_targets, read_jsonl, refuse_none_exist,
                        refuse_repeats)
from .records import RecordsError, Utterance, listing

log = logging.getLogger(__name__)

LABEL_MAP = "label_map.json"
REQUIRED_KEYS = ("key", "wav", "emo")
# EmoBox's own bookkeeping: never targets (length is the duration in seconds).
BOOKKEEPING = ("dataset", "type", "task", "length", "num_frame", "sample_rate", "channel")
SEGMENT_KEYS = ("start_time", "end_time")  # a segment of a file: not supported (whole files are encoded)
FOLD_DIR = re.compile(r"fold_(\d+)")
PATTERN_EXAMPLE = r"--speaker-pattern '^([A-Za-z]+\d+)_'"

# dataset name -> its speaker rule: a file stem -> the speaker, or None when the stem does not
# follow the rule; each rule also has `scheme`, the rule in words for messages
# ("03a01Fa -> 03"), as corpora.base.SpeakerRule does.
SpeakerRules = Mapping[str, Callable[[str], str | None]]


def find_jsonl(corpus_dir: Path) -> Path:
    """The <dataset>.jsonl: `corpus_dir` itself when it is a file, else <folder name>.jsonl in it."""
    corpus_dir = Path(corpus_dir).expanduser().absolute()
    path = corpus_dir if corpus_dir.is_file() else corpus_dir / f"{corpus_dir.name}.jsonl"
    if not path.is_file():
        raise RecordsError(f"{path} does not exist: pass EmoBox's data/<dataset> folder (holding "
                           "<dataset>.jsonl) or the <dataset>.jsonl file itself")
    return path


def read_label_map(path: Path) -> dict[str, str] | None:
    """label_map.json as {emo: class}, or None when there is none (labels kept as written)."""
    if not path.is_file():
        log.warning("%s not found: the emo values are the labels as written", path)
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RecordsError(f"{path} is not JSON ({e}): restore EmoBox's label_map.json") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise RecordsError(f"{path} must be one JSON object mapping emo values to class names, "
                           'e.g. {"N": "Neutral"}: restore EmoBox\'s label_map.json')
    return {str(k).strip(): v.strip() for k, v in table.items()}


def speaker_rule(dataset: str, pattern: str | None,
                 rules: SpeakerRules) -> tuple[Callable[[str], str | None], str]:
    """(file stem -> speaker or None, the rule in words): --speaker-pattern when given, else
    the dataset's own rule among `rules`; RecordsError naming the fix when there is neither."""
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise RecordsError(f"--speaker-pattern {pattern!r} is not a regular expression ({e}): "
                               f"write one with one group, e.g. {PATTERN_EXAMPLE}") from None
        if regex.groups != 1:
            raise RecordsError(f"--speaker-pattern {pattern!r} has {regex.groups} groups: give it "
                               f"exactly one, the speaker, e.g. {PATTERN_EXAMPLE}")

        def by_pattern(stem: str) -> str | None:
            m = regex.search(stem)
            return m[1] if m and m[1] else None
        return by_pattern, f"--speaker-pattern {pattern!r}"
    if dataset not in rules:
        raise RecordsError(f"EmoBox lists no speakers, and this tool knows no speaker rule for dataset "
                           f"{dataset!r} (known: {', '.join(sorted(rules))}): pass "
                           f"--speaker-pattern REGEX with one group capturing the speaker from the "
                           f"file name, e.g. {PATTERN_EXAMPLE}")
    rule = rules[dataset]
    return rule, f"the {dataset} rule {rule.scheme}"


def read_emobox(corpus_dir: Path, speaker_rules: SpeakerRules, audio_root: Path | None = None,
                speaker_pattern: str | None = None) -> list[Utterance]:
    """The records of an EmoBox <dataset>.jsonl (see the module docstring); no label map of
    this tool applied yet. speaker_rules: the datasets whose file names this tool reads
    speakers from."""
    path = find_jsonl(corpus_dir)
    dataset = path.stem.lower()
    manifest = read_jsonl(path)
    absent = [k for k in REQUIRED_KEYS if k not in manifest.columns]
    if absent:
        raise RecordsError(f"{path}: no key(s) {', '.join(absent)} ({manifest.has}): EmoBox metadata "
                           f"has {', '.join(REQUIRED_KEYS)} on every line; for another manifest use "
                           "--corpus csv with --columns")
    decode = read_label_map(path.parent / LABEL_MAP)
    speaker_of, rule = speaker_rule(dataset, speaker_pattern, speaker_rules)
    root = audio_folder(audio_root, path)
    records, unknown, nameless = [], [], []
    for n, cells in manifest.rows:
        where = manifest.at(n)
        for key in REQUIRED_KEYS:
            if not cells.get(key):
                raise RecordsError(f"{where}: {key!r} is empty: fill it in or delete the line")
        if cells.get("type", "raw") != "raw":
            raise RecordsError(f"{where}: type {cells['type']!r}: this tool encodes audio itself; use "
                               "EmoBox's metadata of raw audio (type \"raw\")")
        if any(cells.get(k) for k in SEGMENT_KEYS):
            raise RecordsError(f"{where}: a segment ({', '.join(SEGMENT_KEYS)}) of a file: whole files "
                               "are encoded; cut the segments into files of their own and list those")
        label = cells["emo"] if decode is None else decode.get(cells["emo"])
        if label is None:
            unknown.append((n, cells["emo"]))
        stem = PurePosixPath(cells["wav"].replace("\\", "/")).stem
        speaker = speaker_of(stem)
        if speaker is None:
            nameless.append((n, stem))
        audio = (root / cells["wav"]).resolve()  # symlinks followed: the file the extractor reads
        records.append(Utterance(
            id=cells["key"], path=str(audio), label=label or "", speaker=speaker or "",
            duration=audio_duration(audio) if audio.exists() else 0.0,
            original_label=label or "", listed_path=cells["wav"],
        ))
    if unknown:
        n, emo = unknown[0]
        raise RecordsError(f"{manifest.at(n)}: emo {emo!r} is not in {path.parent / LABEL_MAP} (it maps "
                           f"{listing(sorted(decode))}){more(unknown, manifest.unit)}: add it to "
                           "label_map.json or fix the line")
    if nameless:
        n, stem = nameless[0]
        raise RecordsError(f"{manifest.at(n)}: no speaker found in the file name {stem!r} by {rule}"
                           f"{more(nameless, manifest.unit)}: pass --speaker-pattern REGEX, one group "
                           f"capturing the speaker from the file name, e.g. {PATTERN_EXAMPLE}")
    targets = manifest_targets(manifest, REQUIRED_KEYS + BOOKKEEPING)
    if targets:
        values = {n: cells for n, cells in manifest.rows}
        records = [replace(r, targets={t: float(values[n][t]) for t in targets})
                   for r, (n, _) in zip(records, manifest.rows)]
    numbers = [n for n, _ in manifest.rows]
    refuse_repeats(records, numbers, manifest)
    refuse_none_exist(records, numbers, manifest, root)
    return records


def more(items: list, unit: str) -> str:
    """" (and 3 more lines)" for a message naming the first of `items`."""
    return f" (and {len(items) - 1} more {unit}s)" if len(items) > 1 else ""


# --- folds ------------------------------------------------------------------------------------

@dataclass
class FoldLists:
    """EmoBox's fold files as read: per fold (0-based), the keys it tests and those it trains on
    (train and, where there is one, valid file). source: the folder, for messages."""

    source: Path
    test: list[set[str]]
    train: list[set[str]]


def fold_keys(path: Path) -> set[str]:
    """The keys of one fold file; RecordsError naming the line of a key given twice or missing."""
    manifest = read_jsonl(path)
    keys: dict[str, int] = {}
    for n, cells in manifest.rows:
        key = cells.get("key", "")
        if not key:
            raise RecordsError(f"{manifest.at(n)}: no 'key': every line of an EmoBox fold file names "
                               "its utterance by key")
        if key in keys:
            raise RecordsError(f"{path}, lines {keys[key]} and {n} list key {key!r}: list it once")
        keys[key] = n
    return set(keys)


def one_file(folder: Path, pattern: str) -> Path | None:
    """The one file of `folder` matching `pattern`, None when there is none; RecordsError for several."""
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        raise RecordsError(f"{folder} holds several {pattern} files ({listing(found)}): keep one dataset's")
    return found[0] if found else None


def fold_lists(folds_dir: Path) -> FoldLists:
    """EmoBox's fold_1, fold_2, ... under `folds_dir` (the data/<dataset> folder)."""
    folds_dir = Path(folds_dir)
    numbered = {int(m[1]): p for p in folds_dir.iterdir() if p.is_dir() and (m := FOLD_DIR.fullmatch(p.name))}
    if not numbered:
        raise RecordsError(f"no fold_K folders in {folds_dir}: pass --folds-from EmoBox's data/<dataset> "
                           "folder, which holds fold_1/<dataset>_test_fold_1.jsonl ...")
    if sorted(numbered) != list(range(1, len(numbered) + 1)):
        raise RecordsError(f"{folds_dir} holds folds {sorted(numbered)}: EmoBox numbers them 1 .. K "
                           "without gaps; restore the missing fold folders")
    test, train = [], []
    for k in sorted(numbered):
        folder = numbered[k]
        tests, trains = (one_file(folder, f"*_{part}_fold_{k}.jsonl") for part in ("test", "train"))
        if tests is None or trains is None:
            raise RecordsError(f"{folder} needs <dataset>_train_fold_{k}.jsonl and "
                               f"<dataset>_test_fold_{k}.jsonl: restore them from EmoBox")
        valid = one_file(folder, f"*_valid_fold_{k}.jsonl")
        test.append(fold_keys(tests))
        train.append(fold_keys(trains) | (fold_keys(valid) if valid else set()))
    return FoldLists(folds_dir, test, train)
