"""Folds: speaker independence, coverage, validation carving, stratification, files."""
import json

import numpy as np
import pytest

from ser_cache.folds import (
    Folds,
    FoldsError,
    default_n_folds,
    file_folds,
    kfold_folds,
    loso_folds,
    make_folds,
    split_folds,
)

CLASSES = ["angry", "happy", "neutral", "sad"]


def corpus(n_speakers=24, per_class=(15, 15, 15, 15), n_groups=0, seed=0, uneven=False):
    """Manifest columns of a synthetic corpus: every speaker speaks every class."""
    rng = np.random.default_rng(seed)
    ids, labels, speakers, groups = [], [], [], []
    for s in range(n_speakers):
        for c, n in zip(CLASSES, per_class):
            n = int(rng.integers(1, 2 * n)) if uneven else n
            for u in range(n):
                ids.append(f"s{s:02d}_{c}_{u}")
                labels.append(c)
                speakers.append(f"s{s:02d}")
                groups.append(f"g{s % n_groups}" if n_groups else "")
    return tuple(np.array(a) for a in (ids, labels, speakers, groups))


def assert_honest(folds, labels=None):
    """Every utterance tested once, speakers never on two sides, val inside train."""
    tested = np.zeros(len(folds), dtype=int)
    for k in range(folds.n_folds):
        train, val, test = folds.split(k)
        tested[test] += 1
        assert len(np.intersect1d(train, val)) == len(np.intersect1d(train, test)) == 0
        assert len(train) + len(val) + len(test) == len(folds)
        tr, va, te = (set(folds.speakers[i]) for i in (train, val, test))
        assert not tr & te and not tr & va and not va & te
        assert len(va) >= 1 and len(train) > 0
        if labels is not None:  # the rest of training keeps every class
            assert set(labels[train]) == set(labels)
    assert (tested == 1).all()


def test_ravdess_like_kfold_has_four_actors_per_fold():
    ids, labels, speakers, _ = corpus(n_speakers=24)
    folds = make_folds(ids, labels, speakers, corpus="ravdess", seed=3)
    assert folds.protocol == "kfold" and folds.n_folds == 6
    assert_honest(folds, labels)
    for k in range(6):
        train, val, test = folds.split(k)
        assert len(set(speakers[test])) == 4
        assert len(set(speakers[val])) == 20 // 6  # validation: n_train_speakers // n_folds


def test_kfold_is_stratified_on_uneven_speakers():
    ids, labels, speakers, _ = corpus(n_speakers=40, uneven=True, seed=1)
    folds = kfold_folds(ids, labels, speakers, 5, seed=0)
    assert_honest(folds, labels)
    overall = np.array([np.mean(labels == c) for c in CLASSES])
    for k in range(5):
        test = folds.split(k)[2]
        share = np.array([np.mean(labels[test] == c) for c in CLASSES])
        assert np.abs(share - overall).max() < 0.08, (share, overall)


def test_kfold_depends_on_seed_only():
    ids, labels, speakers, _ = corpus(n_speakers=12)
    a, b = kfold_folds(ids, labels, speakers, 4, seed=5), kfold_folds(ids, labels, speakers, 4, seed=5)
    assert np.array_equal(a.test_fold, b.test_fold) and a.val_speakers == b.val_speakers
    np.random.seed(0)  # the global RNG plays no part
    c = kfold_folds(ids, labels, speakers, 4, seed=6)
    assert not np.array_equal(a.test_fold, c.test_fold) or a.val_speakers != c.val_speakers


def test_loso_one_fold_per_group():
    ids, labels, speakers, groups = corpus(n_speakers=10, n_groups=5)
    folds = make_folds(ids, labels, speakers, groups)  # groups present: loso by default
    assert folds.protocol == "loso" and folds.n_folds == 5
    assert_honest(folds, labels)
    for k in range(5):
        train, val, test = folds.split(k)
        assert set(groups[test]) == {f"g{k}"}
        assert len(set(speakers[val])) == 1  # 8 training speakers // 5 folds


def test_loso_refuses_bad_groups():
    ids, labels, speakers, groups = corpus(n_speakers=6, n_groups=3)
    with pytest.raises(FoldsError, match="use protocol 'kfold'"):
        loso_folds(ids, labels, speakers, np.full(len(ids), ""))
    groups = groups.copy()
    groups[0] = "g9"  # speaker s00 now in two groups
    with pytest.raises(FoldsError, match="in groups"):
        loso_folds(ids, labels, speakers, groups)


def test_too_many_folds_and_single_speaker_class():
    ids, labels, speakers, _ = corpus(n_speakers=4)
    with pytest.raises(FoldsError, match="at most 4 folds"):
        kfold_folds(ids, labels, speakers, 5)
    labels = labels.copy()
    labels[speakers == "s01"] = np.where(labels[speakers == "s01"] == "sad", "fear", labels[speakers == "s01"])
    with pytest.raises(FoldsError, match=r"\['fear'\].*single speaker"):
        kfold_folds(ids, labels, speakers, 2)


def test_one_speaker_is_refused_at_training_time_with_the_reason(tmp_path):
    """`extract` only warns about a one-actor corpus; the folds are where it is refused."""
    ids, labels, speakers, _ = corpus(n_speakers=1)
    fold_file = tmp_path / "folds.csv"
    fold_file.write_text("id,fold\n" + "".join(f"{u},0\n" for u in ids))
    for kw in (dict(corpus="ravdess"), dict(groups=np.full(len(ids), "g0")), dict(fold_file=fold_file)):
        with pytest.raises(FoldsError, match=r"every utterance is from speaker 's00'.*need several speakers"):
            make_folds(ids, labels, speakers, **kw)
    # several speakers, but a class from one of them: refused by name, whatever the protocol
    ids, labels, speakers, groups = corpus(n_speakers=4, n_groups=2)
    labels = np.where((speakers == "s01") & (labels == "sad"), "fear", labels)
    for kw in (dict(corpus="ravdess"), dict(groups=groups)):
        with pytest.raises(FoldsError, match=r"\['fear'\].*single speaker"):
            make_folds(ids, labels, speakers, **kw)


def test_defaults_per_corpus():
    assert (default_n_folds("ravdess"), default_n_folds("ShEMO"), default_n_folds("emodb")) == (6, 10, 5)
    assert default_n_folds("somethingelse") == 5


def test_save_load_round_trip(tmp_path):
    ids, labels, speakers, _ = corpus(n_speakers=9)
    folds = kfold_folds(ids, labels, speakers, 3, seed=2)
    folds.save(tmp_path / "folds.csv")
    assert (tmp_path / "folds.csv").read_text().splitlines()[0] == "id,speaker,fold"
    assert json.loads((tmp_path / "folds.json").read_text())["n_folds"] == 3
    again = Folds.load(tmp_path / "folds.csv")
    assert np.array_equal(again.ids, folds.ids) and np.array_equal(again.test_fold, folds.test_fold)
    assert again.val_speakers == folds.val_speakers and again.protocol == "kfold"
    for k in range(3):
        for a, b in zip(again.split(k), folds.split(k)):
            assert np.array_equal(a, b)


def test_aligned_to_reorders():
    ids, labels, speakers, _ = corpus(n_speakers=6)
    folds = kfold_folds(ids, labels, speakers, 3)
    perm = np.random.default_rng(0).permutation(len(ids))
    moved = folds.aligned_to(ids[perm])
    assert np.array_equal(moved.test_fold, folds.test_fold[perm])
    with pytest.raises(FoldsError, match="rebuild the folds"):
        folds.aligned_to(ids[:-1])


def write_fold_file(path, ids, folds):
    path.write_text("id,fold\n" + "".join(f"{i},{f}\n" for i, f in zip(ids, folds)))
    return path


def test_fold_file(tmp_path):
    ids, labels, speakers, _ = corpus(n_speakers=6)
    fold_of_speaker = {f"s{s:02d}": s % 3 for s in range(6)}
    path = write_fold_file(tmp_path / "f.csv", ids, [fold_of_speaker[s] for s in speakers])
    folds = make_folds(ids, labels, speakers, fold_file=path)
    assert folds.protocol == "file" and folds.n_folds == 3
    assert_honest(folds, labels)
    assert np.array_equal(folds.test_fold, [fold_of_speaker[s] for s in speakers])


def test_fold_file_errors(tmp_path):
    ids, labels, speakers, _ = corpus(n_speakers=6)
    good = [int(s[1:]) % 3 for s in speakers]
    with pytest.raises(FoldsError, match="have no fold"):
        file_folds(ids, labels, speakers, write_fold_file(tmp_path / "a.csv", ids[1:], good[1:]))
    with pytest.raises(FoldsError, match="not in the cache"):
        file_folds(ids, labels, speakers, write_fold_file(tmp_path / "b.csv", list(ids) + ["x"], good + [0]))
    with pytest.raises(FoldsError, match="listed twice"):
        file_folds(ids, labels, speakers, write_fold_file(tmp_path / "c.csv", list(ids) + [ids[0]], good + [0]))
    with pytest.raises(FoldsError, match="not an integer"):
        file_folds(ids, labels, speakers, write_fold_file(tmp_path / "d.csv", ids, ["one"] * len(ids)))
    crossing = list(good)
    crossing[0] = (good[0] + 1) % 3  # one utterance of s00 in another fold
    with pytest.raises(FoldsError, match="tested in several folds"):
        file_folds(ids, labels, speakers, write_fold_file(tmp_path / "e.csv", ids, crossing))
    with pytest.raises(FoldsError, match="id,fold"):
        (tmp_path / "f.csv").write_text("utt,split\na,0\n")
        file_folds(ids, labels, speakers, tmp_path / "f.csv")
    with pytest.raises(FoldsError, match="test no utterance"):
        file_folds(ids, labels, speakers, write_fold_file(tmp_path / "g.csv", ids, [2 * f for f in good]))
    with pytest.raises(FoldsError, match="not found"):
        file_folds(ids, labels, speakers, tmp_path / "missing.csv")


def test_folds_check_refuses_val_from_test():
    ids, labels, speakers, _ = corpus(n_speakers=6)
    folds = kfold_folds(ids, labels, speakers, 3)
    test_speaker = speakers[folds.test_fold == 0][0]
    with pytest.raises(FoldsError, match="not training speakers"):
        Folds(folds.ids, folds.speakers, folds.test_fold, [[test_speaker]] + folds.val_speakers[1:],
              "kfold", 0)
    with pytest.raises(FoldsError, match="no validation speakers"):
        Folds(folds.ids, folds.speakers, folds.test_fold, [[]] + folds.val_speakers[1:], "kfold", 0)


# --- protocol split: a corpus's official partition ------------------------------------------------

def msp_like(test_sets=("Test1", "Test2")):
    """Speakers 0-7 Train, 8-9 Development, then two speakers per test set."""
    names = ["Train"] * 8 + ["Development"] * 2 + [t for t in test_sets for _ in range(2)]
    ids, labels, speakers, _ = corpus(n_speakers=len(names), per_class=(2, 2, 2, 2))
    groups = np.array([names[int(s[1:])] for s in speakers])
    return ids, labels, speakers, groups


def test_split_one_fold_per_test_set_trains_on_train_only():
    ids, labels, speakers, groups = msp_like()
    folds = make_folds(ids, labels, speakers, groups, seed=4)  # split names: split by default
    assert folds.protocol == "split" and folds.n_folds == 2 and folds.seed == 4
    assert (folds.test_fold[np.isin(groups, ["Train", "Development"])] == -1).all()
    for k, name in enumerate(["Test1", "Test2"]):
        train, val, test = folds.split(k)
        assert set(groups[train]) == {"Train"}  # never the other test set
        assert set(groups[val]) == {"Development"} and set(groups[test]) == {name}
        assert len(train) == (groups == "Train").sum() and len(val) == (groups == "Development").sum()
        assert folds.val_speakers[k] == ["s08", "s09"]


def test_split_single_test_set_any_case_is_one_fold():
    ids, labels, speakers, groups = msp_like(test_sets=("test",))
    groups = np.char.lower(groups)
    groups[groups == "development"] = "dev"
    folds = split_folds(ids, labels, speakers, groups)
    assert folds.n_folds == 1
    train, val, test = folds.split(0)
    assert set(groups[test]) == {"test"} and set(groups[val]) == {"dev"}
    assert len(train) + len(val) + len(test) == len(ids)


def test_split_natural_order_of_test_sets():
    ids, labels, speakers, groups = msp_like(test_sets=("Test10", "Test2"))
    folds = split_folds(ids, labels, speakers, groups)
    assert set(groups[folds.split(0)[2]]) == {"Test2"} and set(groups[folds.split(1)[2]]) == {"Test10"}


def test_split_save_load_round_trip(tmp_path):
    ids, labels, speakers, groups = msp_like()
    folds = split_folds(ids, labels, speakers, groups)
    folds.save(tmp_path / "folds.csv")
    again = Folds.load(tmp_path / "folds.csv")
    assert again.protocol == "split" and np.array_equal(again.test_fold, folds.test_fold)
    for k in range(2):
        for a, b in zip(again.split(k), folds.split(k)):
            assert np.array_equal(a, b)


def test_split_refusals():
    ids, labels, speakers, groups = msp_like()
    with pytest.raises(FoldsError, match=r"found \['Session1'\]: use protocol 'loso'"):
        split_folds(ids, labels, speakers, np.where(groups == "Train", "Session1", groups))
    with pytest.raises(FoldsError, match=r"found no validation set"):
        split_folds(ids, labels, speakers, np.where(groups == "Development", "Train", groups))
    moved = groups.copy()
    moved[speakers == "s09"] = np.where(np.arange((speakers == "s09").sum()) % 2, "Train", "Development")
    with pytest.raises(FoldsError, match=r"'s09' in train and validation: the official split would"):
        split_folds(ids, labels, speakers, moved)
    moved = groups.copy()
    moved[(speakers == "s10") & (labels == "sad")] = "Train"  # a test speaker in training
    with pytest.raises(FoldsError, match=r"'s10' in test and train"):
        split_folds(ids, labels, speakers, moved)
    fear = np.where((groups != "Train") & (labels == "sad"), "fear", labels)
    with pytest.raises(FoldsError, match=r"classes \['fear'\] have no utterance in the train set"):
        split_folds(ids, fear, speakers, groups)
    with pytest.raises(FoldsError, match="one fold per test set"):
        make_folds(ids, labels, speakers, groups, protocol="split", n_folds=3)


def test_split_speaker_in_two_test_sets_is_allowed_but_not_in_train():
    ids, labels, speakers, groups = msp_like()
    both = groups.copy()
    both[(speakers == "s10") & (labels == "sad")] = "Test2"  # s10 in Test1 and Test2
    folds = split_folds(ids, labels, speakers, both)
    assert set(both[folds.split(0)[0]]) == {"Train"}
    folds = split_folds(ids, labels, speakers, groups)
    with pytest.raises(FoldsError, match="tested in several folds"):  # a train speaker tested
        Folds(folds.ids, folds.speakers, np.where((speakers == "s00") & (labels == "sad"), 0,
                                                  folds.test_fold),
              folds.val_speakers, "split", 0)
    with pytest.raises(FoldsError, match="not training speakers"):  # a test speaker validating
        Folds(folds.ids, folds.speakers, folds.test_fold, [["s10"], ["s08"]], "split", 0)
    with pytest.raises(FoldsError, match=r"test folds must be 0 \.\. 1, found -1"):
        Folds(folds.ids, folds.speakers, folds.test_fold, folds.val_speakers, "kfold", 0)


def test_groups_that_are_not_split_names_keep_loso_by_default():
    ids, labels, speakers, groups = corpus(n_speakers=10, n_groups=5)
    assert make_folds(ids, labels, speakers, groups).protocol == "loso"
    ids, labels, speakers, groups = msp_like()
    assert make_folds(ids, labels, speakers, groups, protocol="loso").n_folds == 4
