"""Speaker-independent folds: which utterances each fold trains, validates and tests on.

Folds are data, not code paths. A `Folds` holds, for every utterance, the 0-based fold in
which it is tested, and for every fold the training speakers held out for validation. It
is built from manifest fields (ids, labels, speakers, groups) with a local RNG, saved next to
every run (`folds.csv` + `folds.json`), and checked on construction:

- every utterance is tested in exactly one fold, and no fold's test set is empty (protocol
  split alone has utterances tested in no fold, fold -1: its train and development sets);
- no speaker appears in two test folds (so never on both sides of a split); under split, no
  speaker of the train or development set is tested;
- every fold holds out >= 1 validation speaker: a training speaker of that fold, never a
  test speaker.

Four protocols:

    loso   one fold per group (IEMOCAP: leave one session out);
    kfold  speaker-independent k-fold, stratified by label where the speakers allow it
           (scikit-learn's StratifiedGroupKFold, shuffled with the seed); the default for
           corpora without groups, k from DEFAULT_N_FOLDS;
    file   the user's own CSV `id,fold` (0-based folds; every utterance listed once), or
           EmoBox's fold files (`--folds-from DIR`, emobox.py: fold_K becomes fold K-1; an
           utterance in no test file, as in EmoBox's single train/test splits, is trained on
           in every fold and tested in none);
    split  a corpus's official partition, read from the groups: train, development
           (validation) and test. One fold per test set: MSP-Podcast's Test1 and Test2 give
           folds 0 and 1, both trained on Train and validated on Development, and a test set
           is never trained on, not even in the other test set's fold. The default when every
           group is a split name (SPLIT_VALIDATION lists the names a development set may have).

Validation split, the same rule for loso, kfold and file (split takes the corpus's own
development set instead): from the training speakers of fold k,
hold out `max(1, n_train_speakers // n_folds)` speakers (IEMOCAP loso: 8 // 5 = 1 speaker;
RAVDESS 6 folds: 20 // 6 = 3 actors; ShEMO 10 folds: about 7 speakers). Among 256 random draws
of that many speakers the one kept is, in order of priority: the one that leaves every class
in training, then covers the most classes, then whose label proportions and share of the
utterances are closest to the training pool's. Held-out speakers stay out of training for that
fold, so the epoch is chosen on speakers the head has never seen, like the test speakers.
When some utterances are tested in no fold (EmoBox's single splits), the divisor is not the
number of folds but the number a fold of that test size would make: n_utterances // test
utterances per fold (one test fold of 1/5 of the corpus holds out 1/5 of the training speakers).

Speaker overlap, FLAWED and only on request (`speaker_overlap`, `--compat-speaker-overlap`):
fold files that test a speaker they also train on (EmoBox's folds of URDU, ShEMO, EmoDB) are
refused, unless asked for by name to compare with numbers published on them. Then the
validation speakers are drawn from every speaker with training utterances in the fold, test
speakers included (their training utterances, never their test ones, choose the epoch), and
every result made on them is labelled speaker-dependent (training.py, report.py, compare.py).

Augmented views (extract --augment, augment.py) are no utterances of their own here: folds are
made on the originals only, and `ViewRows` maps a fold's originals to the rows of a layer that
also holds views. Validation and test are originals only; training adds the views of its own
utterances when asked (TrainConfig.views), so a view is trained on only in the folds that train
its source and is never on the other side of a split from it.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import UserError

PROTOCOLS = ("loso", "kfold", "file", "split")
DEFAULT_N_FOLDS = {"ravdess": 6, "shemo": 10, "emodb": 5}  # RAVDESS: 24 actors, 4 per fold
FALLBACK_N_FOLDS = 5
VAL_CANDIDATES = 256  # random speaker draws scored per fold when carving the validation split
# protocol split: group names (any case) of the official partition
SPLIT_TRAIN = ("train",)
SPLIT_VALIDATION = ("development", "dev", "validation", "valid", "val")
SPLIT_TEST = re.compile(r"test\d*")  # test, Test1, Test2, ...
NOT_TESTED = -1  # test_fold of the train and development utterances under protocol split


class FoldsError(UserError, ValueError):
    """Folds that cannot be built or trusted; the message names the fix."""


def default_n_folds(corpus: str) -> int:
    """Number of k-fold folds for a corpus name (5 when the corpus is not listed)."""
    return DEFAULT_N_FOLDS.get(corpus.lower(), FALLBACK_N_FOLDS)


@dataclass
class Folds:
    """Test fold per utterance, and validation speakers per fold.

    ids, speakers: (n,) str, in the order of the data they were built for.
    test_fold: (n,) int64, 0-based fold in which each utterance is tested; NOT_TESTED (-1)
        under protocol split for the train and development sets.
    val_speakers: per fold, the sorted training speakers held out for validation.
    protocol: "loso", "kfold", "file" or "split"; seed: the seed of the local RNG that built
        them.
    speaker_overlap: FLAWED folds allowed to test speakers they also train on (only with
        protocol file, on request: --compat-speaker-overlap); refused otherwise.
    """

    ids: np.ndarray
    speakers: np.ndarray
    test_fold: np.ndarray
    val_speakers: list[list[str]]
    protocol: str
    seed: int
    speaker_overlap: bool = False

    def __post_init__(self):
        self.ids = np.asarray(self.ids).astype(str)
        self.speakers = np.asarray(self.speakers).astype(str)
        self.test_fold = np.asarray(self.test_fold, dtype=np.int64)
        self.val_speakers = [sorted(str(s) for s in v) for v in self.val_speakers]
        self.check()

    @property
    def n_folds(self) -> int:
        return len(self.val_speakers)

    def __len__(self) -> int:
        return len(self.ids)

    def check(self) -> None:
        """Raise FoldsError unless the folds are a speaker-independent partition."""
        n, k = len(self.ids), self.n_folds
        if self.speakers.shape != (n,) or self.test_fold.shape != (n,):
            raise FoldsError(f"ids {self.ids.shape}, speakers {self.speakers.shape}, "
                             f"test_fold {self.test_fold.shape} must all be ({n},)")
        if len(set(self.ids)) != n:
            raise FoldsError("utterance ids are not unique: fix the corpus records")
        lowest = NOT_TESTED if self.protocol in ("split", "file") else 0
        if n and (self.test_fold.min() < lowest or self.test_fold.max() >= k):
            raise FoldsError(f"test folds must be {lowest} .. {k - 1}, found "
                             f"{self.test_fold.min()} .. {self.test_fold.max()}")
        empty = sorted(set(range(k)) - set(self.test_fold.tolist()))
        if empty:
            raise FoldsError(f"folds {empty} test no utterance: use fewer folds")
        spk_folds = self.speaker_folds()
        if not self.speaker_overlap:
            refuse_crossing(self.crossing_speakers())
        if self.speaker_overlap and self.protocol != "file":
            raise FoldsError(f"speaker overlap is allowed for fold files only, not protocol {self.protocol!r}")
        for fold, val in enumerate(self.val_speakers):
            if not val:
                raise FoldsError(f"fold {fold} has no validation speakers: the epoch could only be "
                                 "chosen on the test speakers; give every fold at least one")
            if self.protocol == "split":  # from the train or development set
                bad = [str(s) for s in val if spk_folds.get(s) != {NOT_TESTED}]
            else:
                bad = [str(s) for s in val if spk_folds.get(s, {fold}) == {fold}]
            if bad:
                raise FoldsError(f"fold {fold}: validation speakers {bad} are not training "
                                 "speakers of that fold (unknown, or tested in it)")

    def speaker_folds(self) -> dict[str, set]:
        """Speaker -> the test folds of its utterances (NOT_TESTED for never tested ones)."""
        return speaker_folds(self.speakers, self.test_fold)

    def crossing_speakers(self) -> dict[str, list[int]]:
        """Speakers tested in one fold and trained on in another: speaker -> its folds."""
        return crossing_speakers(self.speakers, self.test_fold, self.protocol)

    def split(self, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train_idx, val_idx, test_idx) of fold `fold`: sorted int64 indices, disjoint."""
        if not 0 <= fold < self.n_folds:
            raise FoldsError(f"fold {fold} does not exist: folds are 0 .. {self.n_folds - 1}")
        test = self.test_fold == fold
        val = ~test & np.isin(self.speakers, self.val_speakers[fold])
        # split: only the train set trains; the other test sets stay unseen
        pool = self.test_fold == NOT_TESTED if self.protocol == "split" else ~test
        train = pool & ~val
        return np.flatnonzero(train), np.flatnonzero(val), np.flatnonzero(test)

    def save(self, path: Path) -> None:
        """Write `path` (CSV id,speaker,fold) and `path` with suffix .json (the rest)."""
        path = Path(path)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "speaker", "fold"])
            w.writerows(zip(self.ids, self.speakers, self.test_fold.tolist()))
        meta = {"protocol": self.protocol, "seed": self.seed, "n_folds": self.n_folds,
                "val_speakers": self.val_speakers}
        if self.speaker_overlap:  # absent otherwise: folds saved before it load the same
            meta["speaker_overlap"] = True
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Folds":
        """Read folds written by `save` (the CSV path; the JSON is found beside it)."""
        path = Path(path)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        return cls(ids=[r["id"] for r in rows], speakers=[r["speaker"] for r in rows],
                   test_fold=[int(r["fold"]) for r in rows], val_speakers=meta["val_speakers"],
                   protocol=meta["protocol"], seed=meta["seed"],
                   speaker_overlap=meta.get("speaker_overlap", False))

    def aligned_to(self, ids) -> "Folds":
        """The same folds with rows in the order of `ids` (which must hold the same ids)."""
        ids = np.asarray(ids).astype(str)
        if np.array_equal(ids, self.ids):
            return self
        pos = {u: i for i, u in enumerate(self.ids)}
        missing = [str(u) for u in ids if u not in pos]
        if missing or len(ids) != len(self.ids):
            raise FoldsError(f"the folds were built for other utterances ({len(missing)} of "
                             f"{len(ids)} ids unknown, e.g. {missing[:3]}): rebuild the folds "
                             "from this cache")
        order = np.array([pos[u] for u in ids])
        return Folds(self.ids[order], self.speakers[order], self.test_fold[order],
                     self.val_speakers, self.protocol, self.seed, self.speaker_overlap)


def speaker_folds(speakers, test_fold) -> dict[str, set]:
    """Speaker -> the test folds of its utterances (NOT_TESTED for never tested ones)."""
    spk_folds: dict[str, set] = {}
    for s, f in zip(speakers, test_fold):
        spk_folds.setdefault(s, set()).add(int(f))
    return spk_folds


def crossing_speakers(speakers, test_fold, protocol: str) -> dict[str, list[int]]:
    """Speakers tested in one fold and trained on in another: speaker -> its folds."""
    # under split the test sets never train, so only train/development vs test crosses
    return {s: sorted(f) for s, f in speaker_folds(speakers, test_fold).items() if len(f) > 1
            and (protocol != "split" or NOT_TESTED in f)}


def refuse_crossing(crossing: dict[str, list[int]]) -> None:
    """FoldsError naming a speaker tested in one fold and trained on in another, if any."""
    if not crossing:
        return
    s, f = next(iter(crossing.items()))
    s = str(s)
    where = (f"tested in fold {max(f)} and trained on in every fold" if f == [NOT_TESTED, max(f)]
             else f"in folds {f}")
    raise FoldsError(f"{len(crossing)} speakers are tested in several folds, e.g. {s!r} "
                     f"{where}: put all utterances of a speaker in one fold (or, to compare "
                     "with results published on such folds, --compat-speaker-overlap: FLAWED, "
                     "speaker-dependent)")


# --- augmented views --------------------------------------------------------------------------


@dataclass
class ViewRows:
    """Where the augmented views lie among a layer's rows, and the row of each one's source.

    ids: (n,) str, the rows' utterance ids (originals and views, in the layer's order).
    originals: (n_originals,) int64, the rows of the corpus's own utterances, ascending: the
        rows folds are made on (`original_ids`).
    views: (n_views,) int64, the rows of the views, ascending; view_source: (n_views,) int64,
        the row of each view's source, -1 when the source is not among the rows (skipped, or
        dropped by a label map): such a view is never used.
    """

    ids: np.ndarray
    originals: np.ndarray
    views: np.ndarray
    view_source: np.ndarray

    @classmethod
    def of(cls, ids, sources: Mapping[str, str] | None = None) -> "ViewRows":
        """The views among `ids` by `sources` ({view id: source id}, cache.Cache.view_sources);
        none when it is empty or None."""
        ids = np.asarray(ids).astype(str)
        sources = sources or {}
        is_view = np.fromiter((u in sources for u in ids.tolist()), dtype=bool, count=len(ids))
        row = {u: i for i, u in enumerate(ids.tolist())}
        views = np.flatnonzero(is_view)
        view_source = np.array([row.get(sources[u], -1) for u in ids[views].tolist()], dtype=np.int64)
        assert not is_view[view_source[view_source >= 0]].any(), "a view of a view"
        return cls(ids, np.flatnonzero(~is_view), views, view_source)

    @property
    def original_ids(self) -> np.ndarray:
        return self.ids[self.originals]

    def split(self, folds: Folds, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Folds.split of folds made on the originals, as rows of the layer: (train, val, test),
        originals only (add the training views with `with_views`)."""
        parts = folds.aligned_to(self.original_ids).split(fold)
        return tuple(self.originals[p] for p in parts)

    def views_of(self, rows) -> np.ndarray:
        """The rows of the views of `rows` (originals), ascending."""
        return self.views[np.isin(self.view_source, rows)]

    def with_views(self, rows) -> np.ndarray:
        """`rows` (originals) and the rows of their views, sorted."""
        return np.sort(np.concatenate([np.asarray(rows, dtype=np.int64), self.views_of(rows)]))

    def count_views(self, rows) -> int:
        """How many of `rows` are views."""
        return int(np.isin(rows, self.views).sum())


# --- builders --------------------------------------------------------------------------------


def make_folds(ids, labels, speakers, groups=None, *, protocol: str | None = None,
               n_folds: int | None = None, corpus: str = "", fold_file: Path | None = None,
               folds_from: Path | None = None, seed: int = 0, left_out=(),
               speaker_overlap: bool = False) -> Folds:
    """Folds by protocol name. protocol None: "file" if a fold file (or EmoBox's folds,
    folds_from) is given, "split" if every group is a split name (train, development,
    test...), "loso" if the utterances have groups, else "kfold" with n_folds (default from
    DEFAULT_N_FOLDS[corpus]). left_out: ids of the cache that are not in `ids` (a label map
    dropped them), which a fold file may still list. speaker_overlap: FLAWED, let fold files
    test speakers they train on; refused when the folds have no such speaker (nothing to allow)."""
    folds = _make_folds(ids, labels, speakers, groups, protocol=protocol, n_folds=n_folds, corpus=corpus,
                        fold_file=fold_file, folds_from=folds_from, seed=seed, left_out=left_out,
                        speaker_overlap=speaker_overlap)
    if speaker_overlap and not folds.crossing_speakers():
        raise FoldsError("these folds test no speaker they also train on: drop --compat-speaker-overlap "
                         "(the results are honest without it)")
    return folds


def _make_folds(ids, labels, speakers, groups, *, protocol, n_folds, corpus, fold_file, folds_from,
                seed, left_out, speaker_overlap) -> Folds:
    groups = np.full(len(ids), "") if groups is None else np.asarray(groups).astype(str)
    if fold_file is not None and folds_from is not None:
        raise FoldsError("a fold file and EmoBox's folds were both given: pass one of them")
    if protocol is None:
        protocol = ("file" if fold_file or folds_from else "split" if all(map(split_role, set(groups)))
                    else "loso" if (groups != "").all() else "kfold")
    if protocol not in PROTOCOLS:
        raise FoldsError(f"unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    if (fold_file is not None or folds_from is not None) and protocol != "file":
        raise FoldsError(f"a fold file was given with protocol {protocol!r}: use protocol 'file'")
    if speaker_overlap and protocol != "file":
        raise FoldsError(f"protocol {protocol!r} never tests a speaker it trains on: drop "
                         "--compat-speaker-overlap (it is for fold files: --fold-file, --folds-from)")
    if protocol == "loso":
        if n_folds is not None and n_folds != len(set(groups)):
            raise FoldsError(f"loso makes one fold per group ({len(set(groups))}), not {n_folds}: "
                             "drop the number of folds or use protocol 'kfold'")
        return loso_folds(ids, labels, speakers, groups, seed=seed)
    if protocol == "split":
        if n_folds is not None:
            raise FoldsError(f"split makes one fold per test set of the corpus, not {n_folds}: "
                             "drop the number of folds or use protocol 'kfold'")
        return split_folds(ids, labels, speakers, groups, seed=seed)
    if protocol == "kfold":
        return kfold_folds(ids, labels, speakers, n_folds or default_n_folds(corpus), seed=seed)
    if folds_from is not None:
        return emobox_folds(ids, labels, speakers, folds_from, seed=seed, left_out=left_out,
                            speaker_overlap=speaker_overlap)
    if fold_file is None:
        raise FoldsError("protocol 'file' needs a fold file (CSV with columns id,fold)")
    return file_folds(ids, labels, speakers, fold_file, seed=seed, left_out=left_out,
                      speaker_overlap=speaker_overlap)


def loso_folds(ids, labels, speakers, groups, seed: int = 0) -> Folds:
    """One fold per group, groups in sorted order (fold 0 tests the first group)."""
    ids, labels, speakers, groups = _arrays(ids, labels, speakers, groups)
    if (groups == "").any():
        raise FoldsError(f"{(groups == '').sum()} utterances have no group, so leave-one-group-"
                         "out is impossible: use protocol 'kfold'")
    spk_groups = {}
    for s, g in zip(speakers, groups):
        if spk_groups.setdefault(s, g) != g:
            raise FoldsError(f"speaker {s!r} is in groups {spk_groups[s]!r} and {g!r}: "
                             "leave-one-group-out would not be speaker-independent")
    _check_labels(labels, speakers)  # first: one speaker is also one group, and kfold is no fix
    names = sorted(set(groups))
    if len(names) < 2:
        raise FoldsError(f"only one group ({names}): loso needs at least 2; use 'kfold'")
    test_fold = np.searchsorted(names, groups)
    return _with_validation(ids, labels, speakers, test_fold, "loso", seed)


def split_role(group: str) -> str | None:
    """"train", "validation" or "test" for a split name of protocol split (any case), else None."""
    g = str(group).strip().lower()
    if g in SPLIT_TRAIN:
        return "train"
    if g in SPLIT_VALIDATION:
        return "validation"
    return "test" if SPLIT_TEST.fullmatch(g) else None


def split_folds(ids, labels, speakers, groups, seed: int = 0) -> Folds:
    """The corpus's official partition (groups train / development / test...) as folds.

    One fold per test set, in natural order (Test1 before Test2); every fold trains on the
    train set and validates on the development set's speakers. `seed` is only recorded: the
    partition is the corpus's, nothing is drawn.
    """
    ids, labels, speakers, groups = _arrays(ids, labels, speakers, groups)
    roles = {g: split_role(g) for g in set(groups.tolist())}
    unknown = sorted(g for g, role in roles.items() if role is None)
    if unknown:
        raise FoldsError(
            f"protocol 'split' needs every group to name a split: train, development (or "
            f"{', '.join(SPLIT_VALIDATION[1:])}) or test (test1, test2, ...); found "
            f"{unknown}: use protocol 'loso' or 'kfold', or fix the corpus's split names"
        )
    role = np.array([roles[g] for g in groups])
    tests = sorted({g.strip().lower() for g, r in roles.items() if r == "test"},
                   key=lambda g: (len(g), g))  # test2 before test10
    missing = [r for r in ("train", "validation", "test") if r not in set(role)]
    if missing:
        raise FoldsError(f"protocol 'split' found no {' or '.join(missing)} set among the groups "
                         f"{sorted(roles)}: every one of train, development and test is needed")
    spk_roles: dict[str, set] = {}
    for s, r in zip(speakers, role):
        spk_roles.setdefault(s, set()).add(r)
    shared = {s: sorted(r) for s, r in spk_roles.items() if len(r) > 1}  # Test1+Test2 is fine
    if shared:
        s, r = min(shared.items())
        s = str(s)
        raise FoldsError(
            f"{len(shared)} speakers are in several splits, e.g. {s!r} in {' and '.join(r)}: "
            "the official split would not be speaker-independent; fix the corpus's split or "
            "speaker ids, or use protocol 'kfold'"
        )
    untrained = sorted(map(str, set(labels[role != "train"]) - set(labels[role == "train"])))
    if untrained:
        raise FoldsError(f"classes {untrained} have no utterance in the train set, so no head can "
                         "learn them: drop or merge them in the corpus label map")
    test_fold = np.full(len(ids), NOT_TESTED, dtype=np.int64)
    for k, name in enumerate(tests):
        test_fold[np.char.lower(np.char.strip(groups)) == name] = k
    val = sorted(set(speakers[role == "validation"].tolist()))
    return Folds(ids, speakers, test_fold, [val] * len(tests), "split", seed)


def kfold_folds(ids, labels, speakers, n_folds: int, seed: int = 0) -> Folds:
    """Speaker-independent k-fold, label-stratified where possible, shuffled with `seed`."""
    from sklearn.model_selection import StratifiedGroupKFold

    ids, labels, speakers, _ = _arrays(ids, labels, speakers)
    _check_labels(labels, speakers)  # first: "use at most 1 folds" would be no fix for one speaker
    n_spk = len(set(speakers))
    if n_folds < 2:
        raise FoldsError(f"k-fold needs at least 2 folds, got {n_folds}")
    if n_folds > n_spk:
        raise FoldsError(f"{n_folds} folds but only {n_spk} speakers: every fold needs its own "
                         f"test speakers, so use at most {n_spk} folds")
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    test_fold = np.full(len(ids), -1, dtype=np.int64)
    for fold, (_, test) in enumerate(sgkf.split(np.zeros(len(ids)), labels, groups=speakers)):
        test_fold[test] = fold
    assert (test_fold >= 0).all(), "StratifiedGroupKFold left utterances untested"
    return _with_validation(ids, labels, speakers, test_fold, "kfold", seed)


def file_folds(ids, labels, speakers, path: Path, seed: int = 0, left_out=(),
               speaker_overlap: bool = False) -> Folds:
    """Folds read from the user's CSV with columns id,fold (0-based, every id exactly once).
    Rows of `left_out` ids (utterances of the cache a label map dropped) are passed over, so
    one fold file serves the cache with and without the map."""
    ids, labels, speakers, _ = _arrays(ids, labels, speakers)
    path = Path(path)
    if not path.is_file():
        raise FoldsError(f"fold file {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"id", "fold"} <= set(reader.fieldnames or []):
            raise FoldsError(f"{path}: needs a header with columns id,fold, found "
                             f"{reader.fieldnames}")
        rows = list(reader)
    given: dict[str, int] = {}
    for line, r in enumerate(rows, 2):
        try:
            fold = int(r["fold"])
        except ValueError:
            raise FoldsError(f"{path}:{line}: fold {r['fold']!r} is not an integer") from None
        if r["id"] in given:
            raise FoldsError(f"{path}:{line}: id {r['id']!r} is listed twice")
        given[r["id"]] = fold
    missing = [str(u) for u in ids if u not in given]
    if missing:
        raise FoldsError(f"{path}: {len(missing)} utterances of the cache have no fold, e.g. "
                         f"{missing[:3]}: list every id")
    unknown = sorted(set(given) - set(ids) - set(left_out))
    if unknown:
        raise FoldsError(f"{path}: {len(unknown)} ids are not in the cache, e.g. {unknown[:3]}")
    test_fold = np.array([given[u] for u in ids], dtype=np.int64)
    if test_fold.min() != 0:
        raise FoldsError(f"{path}: folds must start at 0 (found {test_fold.min()})")
    _check_labels(labels, speakers)
    return _with_validation(ids, labels, speakers, test_fold, "file", seed, speaker_overlap)


def emobox_folds(ids, labels, speakers, folds_dir: Path, seed: int = 0, left_out=(),
                 speaker_overlap: bool = False) -> Folds:
    """Folds read from EmoBox's fold_K/<dataset>_{train,test}_fold_K.jsonl (emobox.py): fold
    K-1 tests fold_K's test keys and trains on every other utterance, which must be the keys
    its train (and valid) file lists; keys of `left_out` (a label map dropped them) are passed
    over. Validation is carved from the training speakers as for a fold file."""
    from .emobox import fold_lists

    ids, labels, speakers, _ = _arrays(ids, labels, speakers)
    lists = fold_lists(folds_dir)
    known, skipped = set(ids.tolist()), set(left_out)
    unknown = sorted(set().union(*lists.test, *lists.train) - known - skipped)
    if unknown:
        raise FoldsError(f"{lists.source}: {len(unknown)} keys of the fold files are not in the cache, e.g. "
                         f"{unknown[:3]}: extract the corpus from the same EmoBox metadata (ids = keys)")
    test_fold = np.full(len(ids), NOT_TESTED, dtype=np.int64)
    position = {u: i for i, u in enumerate(ids.tolist())}
    for k, (test, train) in enumerate(zip(lists.test, lists.train)):
        both = sorted(test & train)
        if both:
            raise FoldsError(f"{lists.source}: fold_{k + 1} lists {len(both)} keys as both train and test, "
                             f"e.g. {both[:3]}: restore its files from EmoBox")
        neither = sorted(known - test - train)
        if neither:
            raise FoldsError(f"{lists.source}: fold_{k + 1} lists {len(neither)} utterances of the cache in "
                             f"neither its train nor its test file, e.g. {neither[:3]}: a fold trains on "
                             "every utterance it does not test; extract the corpus from the same metadata")
        for u in sorted(test & known):
            i = position[u]
            if test_fold[i] != NOT_TESTED:
                raise FoldsError(f"{lists.source}: key {u!r} is tested in fold_{test_fold[i] + 1} and "
                                 f"fold_{k + 1}: test every utterance in one fold at most")
            test_fold[i] = k
    empty = [k + 1 for k in range(len(lists.test)) if not (test_fold == k).any()]
    if empty:
        raise FoldsError(f"{lists.source}: fold_{empty[0]} tests no utterance of the cache: extract the "
                         "corpus from the same EmoBox metadata")
    _check_labels(labels, speakers)
    return _with_validation(ids, labels, speakers, test_fold, "file", seed, speaker_overlap)


# --- helpers ---------------------------------------------------------------------------------


def _arrays(*columns):
    out = [np.asarray(c).astype(str) for c in columns]
    n = len(out[0])
    assert all(len(c) == n for c in out), f"columns of lengths {[len(c) for c in out]}"
    return out + [None] * (4 - len(out))


def _check_labels(labels: np.ndarray, speakers: np.ndarray) -> None:
    """A class spoken by one speaker only cannot be both trained and tested speaker-independently.

    `extract` only warns about such data (a one-actor cache still has its uses); this is where
    it is refused.
    """
    names = set(speakers.tolist())
    if len(names) == 1:
        raise FoldsError(f"every utterance is from speaker {names.pop()!r}: speaker-independent folds test "
                         "each fold on speakers the head never trained on, so they need several speakers; "
                         "train on a cache of a corpus with more speakers")
    spk_per_label = {lab: len(set(speakers[labels == lab])) for lab in np.unique(labels)}
    single = sorted(str(lab) for lab, n in spk_per_label.items() if n < 2)
    if single:
        raise FoldsError(f"classes {single} are spoken by a single speaker, so a speaker-"
                         "independent split cannot both train and test them: drop or merge "
                         "these classes in the corpus label map")


def _with_validation(ids, labels, speakers, test_fold, protocol, seed, speaker_overlap=False) -> Folds:
    if not speaker_overlap:  # before carving, which would fail less clearly on such folds
        refuse_crossing(crossing_speakers(speakers, test_fold, protocol))
    n_folds = int(test_fold.max()) + 1
    tested = int((test_fold != NOT_TESTED).sum())
    # held out: 1 / n_folds of the training speakers, or with untested utterances the share a
    # fold of this test size would be (module docstring)
    share = n_folds if tested == len(test_fold) else max(2, len(test_fold) * n_folds // tested)
    names, spk = np.unique(speakers, return_inverse=True)
    _, lab = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(names), lab.max() + 1), dtype=np.int64)  # (speakers, classes)
    np.add.at(counts, (spk, lab), 1)
    rng = np.random.default_rng([seed, 0x5E7])  # local: the folds never touch global RNG state
    val = []
    for k in range(n_folds):
        # training speakers: some utterances outside fold k, none in it (a speaker crossing
        # folds is left out here and refused by Folds.check)
        pool = np.unique(spk[test_fold != k])
        if not speaker_overlap:
            pool = np.setdiff1d(pool, spk[test_fold == k])
        val.append(names[pool[_carve_validation(counts[pool], share, rng)]].tolist())
    return Folds(ids, speakers, test_fold, val, protocol, seed, speaker_overlap)


def _carve_validation(counts: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (into the rows of `counts`, (pool speakers, classes)) of the speakers held out
    for validation; the rule is in the module docstring."""
    n_pool = len(counts)
    if n_pool < 2:
        raise FoldsError(f"a fold has only {n_pool} training speaker(s), none can be held "
                         "out for validation: use fewer folds or more speakers")
    n_val = max(1, n_pool // n_folds)
    total = counts.sum(axis=0)  # (classes,) of the training pool
    present = total > 0
    cands = np.argsort(rng.random((VAL_CANDIDATES, n_pool)), axis=1)[:, :n_val]  # (cand, n_val)
    val = counts[cands].sum(axis=1)  # (cand, classes)
    lost = ((total - val == 0) & present).sum(axis=1)  # classes gone from training: avoid first
    uncovered = ((val == 0) & present).sum(axis=1)  # classes missing from validation
    distance = np.abs(val / val.sum(axis=1, keepdims=True) - total / total.sum()).sum(axis=1)
    distance += np.abs(val.sum(axis=1) / total.sum() - n_val / n_pool)
    best = np.lexsort((distance, uncovered, lost))[0]
    return np.sort(cands[best])
