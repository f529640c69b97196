"""Check a corpus before extraction: what `extract` would skip and `train` would refuse.

    ser-cache check-corpus DATA_DIR --corpus NAME [extract's corpus options] --check_corpus--> CheckReport

The corpus is read as `extract` reads it (corpora.prepare), then checked; each problem is one
line naming what is wrong (the utterance, class or fold) and the fix:

    corpus      the reader refuses the corpus (a missing column, an empty label, an id given
                twice...): its own message, and nothing further can be checked;
    missing     a listed file that does not exist (a dataset example without audio);
    unreadable  audio that extract would skip: every file is read and decoded as extract reads
                it (audio.load_utterance, under --long-audio), so a cut WAV, an empty file or
                one over 30 s is named here with extract's reason;
    label       a label outside --labels, when given; labels that differ only in case or
                surrounding spaces ("Angry" and "angry": one class spelt two ways);
    speakers    a class spoken by a single speaker (no speaker-independent fold can both train
                and test it), and a class that some folds test none of (fewer speakers than
                folds): those folds' metrics leave it out;
    folds       the folds `train` would build (its default protocol and number of folds, or
                --protocol, --folds, --folds-from) cannot be built, e.g. too few speakers;
    release     for a public corpus with a shipped SHA-256 list (ravdess, emodb), a
                listed file that is missing or whose bytes differ from the release's
                (download.check_corpus). A copy converted to another format cannot be checked
                against the list: that is said once, as information, not as a problem.

The speaker and fold checks use the records extract would keep (those with usable audio).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import download
from .audio import AudioError, audio_exists, load_utterance
from .corpora import RELEASES, prepare, single_speaker_labels
from .errors import UserError
from .folds import NOT_TESTED, make_folds
from .hfexamples import DATASET_REF_PREFIX
from .records import Utterance

WORKERS = 4  # threads decoding audio at once: libsndfile and soxr release the GIL


@dataclass
class CheckReport:
    """What check-corpus found: `info` lines (the corpus's summary), one line per problem."""

    info: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The report as printed before the count: info, then the problems."""
        return "\n".join(self.info + self.problems)

    def count(self) -> str:
        """The last line: how many problems."""
        n = len(self.problems)
        return f"{n} problem{'s' * (n != 1)}" if n else "no problems"


def audio_problems(records: list[Utterance], long_audio: str) -> dict[str, str]:
    """{id: problem line} for every record whose audio extract would skip."""
    def problem(r: Utterance) -> str:
        if not audio_exists(r.path):
            what = "the example holds no audio" if r.path.startswith(DATASET_REF_PREFIX) else f"{r.path} does not exist"
            return f"missing: {r.id}: {what}"
        try:
            load_utterance(r.path, long_audio)
        except AudioError as e:
            return f"unreadable: {r.id}: {e.reason} [{r.listed_path or r.path}]"
        return ""

    with ThreadPoolExecutor(WORKERS) as pool:
        lines = list(pool.map(problem, records))
    return {r.id: line for r, line in zip(records, lines) if line}


def label_problems(records: list[Utterance], expected: list[str] | None) -> list[str]:
    """Labels outside `expected` (when given), and labels spelt two ways."""
    counts = Counter(r.label for r in records)
    lines = []
    if expected:
        for label, n in sorted(counts.items()):
            if label not in expected:
                example = next(r.id for r in records if r.label == label)
                lines.append(f"label: {label!r} ({n} utterances, e.g. {example}) is not one of --labels "
                             f"{','.join(expected)}: fix the label, or pick a --label-map that maps it")
    spellings = defaultdict(list)
    for label in sorted(counts):
        spellings[label.strip().casefold()].append(label)
    for same in spellings.values():
        if len(same) > 1:
            lines.append("label: " + " and ".join(f"{s!r} ({counts[s]})" for s in same) + " differ only in case "
                         "or spaces: one class spelt two ways; write one spelling in the manifest")
    return lines


def fold_problems(records: list[Utterance], corpus: str, protocol: str | None, n_folds: int | None,
                  folds_from: Path | None, speaker_overlap: bool) -> tuple[str, list[str]]:
    """(a line describing the folds, problems): classes of one speaker, the folds `train` would
    build, and classes some folds test none of."""
    single = single_speaker_labels(records)
    if single:  # the folds would be refused for it: the classes say why more precisely
        return "", [f"speakers: class {label!r} is spoken by {speaker!r} alone: no speaker-independent fold "
                    "can both train and test it; drop or merge it with a --label-map, or add speakers"
                    for label, speaker in single.items()]
    try:
        folds = make_folds([r.id for r in records], [r.label for r in records], [r.speaker for r in records],
                           [r.group for r in records], protocol=protocol, n_folds=n_folds, corpus=corpus,
                           folds_from=folds_from, speaker_overlap=speaker_overlap)
    except UserError as e:
        return "", [f"folds: {e}"]
    tested = defaultdict(set)  # class -> folds testing some of it
    for r, fold in zip(records, folds.test_fold.tolist()):
        if fold != NOT_TESTED:
            tested[r.label].add(fold)
    speakers = defaultdict(set)
    for r in records:
        speakers[r.label].add(r.speaker)
    lines = [f"speakers: class {label!r} ({len(speakers[label])} speakers) is tested in {len(tested[label])} of "
             f"{folds.n_folds} folds: the others' metrics leave it out; use fewer folds (--folds) or add speakers"
             for label in sorted(speakers) if 0 < len(tested[label]) < folds.n_folds]
    return f"folds: {folds.protocol}, {folds.n_folds} folds, as train builds them", lines


def release_problems(corpus: str, data_dir: Path, info: list[str]) -> list[str]:
    """One line per listed file of a public release that is missing or altered in data_dir
    (none for a corpus without a shipped SHA-256 list); what cannot be checked goes to `info`."""
    if corpus not in RELEASES or RELEASES[corpus].checksums is None or not Path(data_dir).is_dir():
        return []  # no published list (ShEMO publishes none): nothing to check against
    found = download.check_corpus(corpus, Path(data_dir), progress=False)
    if found.converted or found.note:
        info.append(f"release: {found.note or 'not the files of the original release (another format)'}: "
                    "their SHA-256 cannot be checked against the published list")
        return []
    info.append(f"release: {found.listed} files listed in the published SHA-256 list, {found.ok} identical")
    fix = f"download it again (`ser-cache download {corpus} --to DIR`)"
    return ([f"release: {name} is missing from {found.folder}: {fix}" for name in found.missing]
            + [f"release: {name} differs from the published file (SHA-256): {fix}" for name in found.altered])


def check_corpus(corpus: str, data_dir: Path, *, label_map: str | None = None, long_audio: str = "refuse",
                 labels: list[str] | None = None, protocol: str | None = None, n_folds: int | None = None,
                 folds_from: Path | None = None, speaker_overlap: bool = False, **options) -> CheckReport:
    """Read the corpus as extract does and check it (the module docstring lists the checks).

    options: the corpus options of `corpora.prepare` (csv_path, audio_root, columns,
    speaker_pattern).
    """
    report = CheckReport()
    try:
        prepared = prepare(corpus, data_dir, label_map=label_map, **options)
    except UserError as e:
        report.problems.append(f"corpus: {e}")
        return report
    report.info.append(prepared.summary(warnings=False))
    bad = audio_problems(prepared.records, long_audio)
    report.problems += bad.values()
    usable = [r for r in prepared.records if r.id not in bad]
    if bad:
        report.info.append(f"{len(usable)} of {len(prepared.records)} utterances have usable audio; the "
                           "checks below use those")
    speakers = defaultdict(set)
    for r in usable:
        speakers[r.label].add(r.speaker)
    report.info.append("speakers per class: " + ", ".join(f"{c} {len(s)}" for c, s in sorted(speakers.items())))
    report.problems += release_problems(corpus, data_dir, report.info)
    report.problems += label_problems(prepared.records, labels)  # labels are metadata: every record's
    if usable:
        folds, lines = fold_problems(usable, corpus, protocol, n_folds, folds_from, speaker_overlap)
        report.info += [folds] if folds else []
        report.problems += lines
    return report

