"""Training across folds: reproducibility, honest selection, flawed switches, run folder, and
the reason attention pooling exists (evidence in a few frames beats a time average)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ser_cache.batches import make_batches, predict_proba
from ser_cache.tasks import Classification
from ser_cache.features import LayerData
from ser_cache.folds import Folds, kfold_folds
from ser_cache.heads import load_head
from ser_cache.config import ConfigError, TrainConfig
from ser_cache.fitting import NonFiniteLossError, fit_head, fold_seed, get_lr, ua_of
from ser_cache.training import run_folds

# Small heads and few epochs: the invariants do not depend on size.
SMALL = dict(epochs=3, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")


def layer_data(n_speakers=6, per_speaker=12, n_classes=3, dim=8, frames=(5, 15), seed=0, prefix="") -> LayerData:
    """Random frames shifted by 2 in the dimension of their class: an easy task (linearly
    separable from the time average), every speaker speaks every class. `prefix` starts every
    id and speaker name (a second corpus)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(*frames, size=n_speakers * per_speaker)
    x = rng.normal(size=(lengths.sum(), dim)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = np.arange(len(lengths)) % n_classes
    for i, c in enumerate(labels):
        x[offsets[i] : offsets[i + 1], c] += 2.0
    n = len(lengths)
    return LayerData(x, offsets, np.array([f"{prefix}u{i:03d}" for i in range(n)]), np.array([f"c{c}" for c in labels]),
                     np.array([f"{prefix}s{i // per_speaker}" for i in range(n)]), np.array([""] * n), layer=1)


def needle_data(n_speakers, per_speaker, seed, n_classes=4, dim=16, n_evidence=3, frames=(60, 100),
                marker=5.0) -> LayerData:
    """The class shows only in `n_evidence` consecutive frames at a random place.

    Every frame carries the pattern of some class plus unit noise in dimensions 1..dim-1; the
    other frames' classes are drawn uniformly, so a time average holds all classes in nearly
    equal parts and the true class has only `n_evidence` frames more (about 0.8 standard
    deviations of the counts at 80 frames). The evidence frames are marked in dimension 0, so
    attention can find them and read their class cleanly.
    """
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(n_classes, dim - 1))
    xs, labels = [], []
    for i in range(n_speakers * per_speaker):
        c, T = i % n_classes, int(rng.integers(*frames))
        cls = rng.integers(n_classes, size=T)
        start = int(rng.integers(0, T - n_evidence + 1))
        cls[start : start + n_evidence] = c
        x = rng.normal(size=(T, dim)).astype(np.float32)
        x[:, 1:] += patterns[cls]
        x[start : start + n_evidence, 0] += marker
        xs.append(x)
        labels.append(f"c{c}")
    n = len(xs)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64)
    return LayerData(np.concatenate(xs), offsets, np.array([f"u{i:04d}" for i in range(n)]), np.array(labels),
                     np.array([f"s{i // per_speaker}" for i in range(n)]), np.array([""] * n), layer=1)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: one thread is faster than several, and does not spin-wait when
    other processes share the cores (2 threads on 2 busy cores made this file 7x slower).
    The library itself leaves torch's thread count alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def folds_of(data, n_folds=3, seed=0) -> Folds:
    return kfold_folds(data.ids, data.labels, data.speakers, n_folds, seed=seed)


@pytest.fixture(scope="module")
def data():
    return layer_data()


def test_config_refuses_unknown_keys_and_bad_types():
    assert TrainConfig.from_dict({"lr": 1, "epochs": 4}) == TrainConfig(lr=1.0, epochs=4)
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        TrainConfig.from_dict({"epochs": 2.5})
    with pytest.raises(ConfigError, match="dropout"):
        TrainConfig(dropout=1.0)
    assert TrainConfig.from_dict(TrainConfig(linear_c=(0.5,)).to_dict()) == TrainConfig(linear_c=(0.5,))


def test_no_attention_heads_is_the_stats_heads_alone(data):
    """n_heads 0 trains the stats head on the probe's features only (no scoring layer); a head
    that pools by attention refuses it, naming the fix, before anything is trained."""
    y = np.searchsorted(sorted(set(data.labels)), data.labels)
    train, val = np.arange(0, 48), np.arange(48, 72)
    config = TrainConfig(**{**SMALL, "n_heads": 0, "epochs": 10, "lr": 3e-2})
    fit = fit_head("stats", data, y, train, val, config, 3, 0, torch.device("cpu"))
    assert fit.options["n_heads"] == 0 and not hasattr(fit.model, "w_a")
    assert fit.model.out.in_features == 2 * data.dim
    # The easy task is read from the statistics alone: over seeds 0-9 validation UA was
    # 0.875-1.0 (chance 0.33).
    assert fit.selected["ua"] >= 0.8
    from ser_cache.errors import OptionError

    for head in ("attentive", "qkv", "cta"):
        with pytest.raises(OptionError, match=rf"the {head} head pools with attention heads: give it --attn-heads 1"):
            fit_head(head, data, y, train, val, config, 3, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match="n_heads must be >= 0"):
        TrainConfig(n_heads=-1)


def test_schedule_warms_up_then_decays():
    config = TrainConfig(epochs=30, lr=1e-3)
    lrs = [get_lr(e, config) for e in range(30)]
    assert lrs[:4] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])  # 3 warm-up epochs
    assert all(a > b > 0 for a, b in zip(lrs[3:], lrs[4:]))  # cosine, never 0


def test_batches_cover_each_utterance_once(data):
    y = np.arange(len(data)) % 3
    index = np.arange(0, len(data), 2)
    batches, order = make_batches(data, y, index, 5, torch.device("cpu"), np.random.default_rng(0))
    assert sorted(order) == sorted(index) and sum(len(b[2]) for b in batches) == len(index)
    x, mask, yb = batches[0]
    assert x.shape[:2] == mask.shape and torch.equal(yb, torch.from_numpy(y[order[:5]]))
    assert torch.equal(mask.sum(1), torch.from_numpy(data.n_frames[order[:5]]))


@pytest.mark.parametrize("head", ["qkv", "linear"])
def test_same_seed_same_metrics(data, head):
    folds = folds_of(data)
    a = run_folds(data, folds, head, TrainConfig(**SMALL, seed=1))
    b = run_folds(data, folds, head, TrainConfig(**SMALL, seed=1))
    assert a.metrics == b.metrics
    for fa, fb in zip(a.folds, b.folds):
        np.testing.assert_array_equal(fa.probs, fb.probs)
    if head != "linear":  # another seed: another initialisation and batch order
        c = run_folds(data, folds, head, TrainConfig(**SMALL, seed=2))
        assert any(not np.array_equal(fa.probs, fc.probs) for fa, fc in zip(a.folds, c.folds))


def test_global_rng_untouched(data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_folds(data, folds_of(data), "mean", TrainConfig(**SMALL))
    assert torch.equal(torch.rand(3), expected)


def test_honest_selection_uses_validation_speakers(data):
    folds = folds_of(data)
    r = run_folds(data, folds, "attentive", TrainConfig(**SMALL))
    for f in r.folds:
        train, val, test = folds.split(f.fold)
        assert (f.n_train, f.n_val) == (len(train), len(val)) and f.test_ids == data.ids[test].tolist()
        assert len(f.history) == SMALL["epochs"] and 0 <= f.selected["epoch"] < SMALL["epochs"]


def test_compat_switches_change_behaviour(data):
    folds = folds_of(data)
    honest = run_folds(data, folds, "attentive", TrainConfig(**SMALL))
    on_test = run_folds(data, folds, "attentive", TrainConfig(**SMALL, compat_select_on_test=True))
    for h, t in zip(honest.folds, on_test.folds):
        assert t.n_train == h.n_train + h.n_val  # no validation split: its speakers train
        assert t.n_val == len(t.test_ids)  # the test fold picks the epoch ...
        assert t.selected["ua"] == pytest.approx(t.metrics["ua"])  # ... so it reports the best test UA
        assert t.metrics["ua"] == pytest.approx(max(e["select_ua"] for e in t.history))
    dropout = run_folds(data, folds, "attentive", TrainConfig(**SMALL, dropout=0.5, compat_eval_dropout=True))
    again = run_folds(data, folds, "attentive", TrainConfig(**SMALL, dropout=0.5, compat_eval_dropout=True))
    clean = run_folds(data, folds, "attentive", TrainConfig(**SMALL, dropout=0.5))
    assert not np.allclose(dropout.folds[0].probs, clean.folds[0].probs)  # noisy evaluation ...
    np.testing.assert_array_equal(dropout.folds[0].probs, again.folds[0].probs)  # ... yet reproducible
    assert "FLAWED" in dropout.table() and "FLAWED" not in clean.table()


def test_the_fold_runner_chooses_a_setting_on_validation_ties_keeping_the_earlier(data, monkeypatch):
    """run_fold, the one fold runner of train and sweep: the setting with the best validation
    score is tested (of two equal ones, the earlier), and settings the head does not read run once."""
    import dataclasses

    import ser_cache.training as T
    from ser_cache.ensembles import fit_selected
    from ser_cache.tasks import as_task

    scores = {1e-3: 0.5, 3e-3: 0.8, 1e-2: 0.8}  # what validation says of each learning rate

    def scored(head, data, y, train, select, config, task, seed, device):
        chosen = fit_selected(head, data, y, train, select, config, task, seed, device)
        return dataclasses.replace(chosen, selected={**chosen.selected, "ua": scores[config.lr]})

    monkeypatch.setattr(T, "fit_selected", scored)
    folds, y, grid = folds_of(data), data.classes()[1], [{"lr": lr} for lr in scores]
    outcome = T.run_fold("mean", data, y, as_task(3), folds, 0, TrainConfig(**SMALL), torch.device("cpu"), grid)
    assert outcome.values == {"lr": 3e-3} and outcome.record.selected["ua"] == 0.8
    assert [(values, selected["ua"]) for values, selected in outcome.trials] == list(zip(grid, scores.values()))
    assert outcome.record.n_test == len(folds.split(0)[2]) == len(outcome.record.probs)
    linear = T.run_fold("linear", data, y, as_task(3), folds, 0, TrainConfig(**SMALL, linear_c=(1.0,)),
                        torch.device("cpu"), grid)
    assert [values for values, _ in linear.trials] == [{"lr": 1e-3}]  # the probe reads no lr: one setting


def test_non_finite_loss_stops_with_a_clear_error(data):
    with pytest.raises(NonFiniteLossError, match=r"fold 0, epoch 0: .*lower the learning rate"):
        run_folds(data, folds_of(data), "mean", TrainConfig(**SMALL, lr=1e30))


def test_run_folder(data, tmp_path):
    folds = folds_of(data)
    out = tmp_path / "run"
    r = run_folds(data, folds, "qkv", TrainConfig(**SMALL), out, cache={"path": "/x", "model": "tiny"})
    config = json.loads((out / "config.json").read_text())
    assert config["head"] == "qkv" and config["cache"] == {"path": "/x", "model": "tiny"}
    assert TrainConfig.from_dict(config["config"]) == TrainConfig(**SMALL)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("ua", "wa", "macro_f1", "weighted_f1"):
        assert 0 <= metrics[key]["mean"] <= 1 and len(metrics[key]["folds"]) == 3
    assert set(metrics["per_class_recall"]) == {"c0", "c1", "c2"} and "confusion" in metrics
    assert all(d["train_seconds"] > 0 and d["eval_seconds"] > 0 for d in metrics["fold_details"])
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == list(data.ids)
    assert set(rows[0]) == {"id", "fold", "label", "prediction", "prob_c0", "prob_c1", "prob_c2"}
    assert all(abs(sum(float(row[f"prob_c{c}"]) for c in range(3)) - 1) < 1e-4 for row in rows)
    loaded = Folds.load(out / "folds.csv")
    assert np.array_equal(loaded.test_fold, folds.test_fold) and loaded.val_speakers == folds.val_speakers
    head, info = load_head(out / "fold_1.pt")  # reloads and reproduces that fold's test predictions
    assert info["labels"] == ["c0", "c1", "c2"] and info["layer"] == 1 and info["head"] == "qkv"
    test = folds.split(1)[2]
    assert r.folds[1].test_ids == data.ids[test].tolist()
    x, mask = data.batch(test)
    with torch.no_grad():
        probs = head(x, mask).softmax(-1).numpy()
    np.testing.assert_allclose(probs, r.folds[1].probs, atol=1e-5)
    assert f"{100 * r.metrics['ua']['mean']:.2f} ± " in r.table()
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run_folds(data, folds, "qkv", TrainConfig(**SMALL), out)


def test_linear_run_folder(data, tmp_path):
    r = run_folds(data, folds_of(data), "linear", TrainConfig(linear_c=(0.1, 1.0)), tmp_path)
    assert all(f.selected["C"] in (0.1, 1.0) for f in r.folds)
    model, info = load_head(tmp_path / "fold_0.pt")
    assert info["head"] == "linear" and info["selected"]["C"] == r.folds[0].selected["C"]
    x, mask = data.batch(folds_of(data).split(0)[2])
    with torch.no_grad():
        np.testing.assert_allclose(model(x, mask).softmax(-1).numpy(), r.folds[0].probs, atol=1e-12)
    assert r.metrics["ua"]["mean"] > 0.9  # the class shifts its own dimension: easy


# --- refit after selection ------------------------------------------------------------------------


@pytest.mark.parametrize("head, key", [("qkv", "epoch"), ("linear", "C")])
def test_refit_trains_on_training_and_validation_with_the_choice_then_tests_once(data, monkeypatch, head, key):
    import ser_cache.ensembles as T

    folds, fits, scored = folds_of(data), [], []
    real_fit, real_predict = T.fit_head, T.predict_proba

    def fit_head(name, d, y, train, select, config, n, seed, device, fixed=None):
        fit = real_fit(name, d, y, train, select, config, n, seed, device, fixed)
        fits.append((set(np.asarray(train).tolist()), select, seed, fixed, fit.model))
        return fit

    monkeypatch.setattr(T, "fit_head", fit_head)
    import ser_cache.training as runs

    for module in (T, runs):  # the refit's validation score, the fold's test
        monkeypatch.setattr(module, "predict_proba", lambda model, d, index, *a: (
            scored.append((model, set(np.asarray(index).tolist()))), real_predict(model, d, index, *a))[1])
    r = run_folds(data, folds, head, TrainConfig(**SMALL, refit=True, linear_c=(0.1, 1.0)))
    assert len(fits) == 2 * folds.n_folds
    for f, first, second in zip(r.folds, fits[::2], fits[1::2]):
        train, val, test = (set(i.tolist()) for i in folds.split(f.fold))
        assert first[0] == train and set(first[1].tolist()) == val and first[3] is None  # chosen on validation
        assert second[0] == train | val and second[1] is None  # then trained on both ...
        assert second[3] == {key: f.selected[key]} and second[2] == first[2]  # ... with that choice, same seed
        assert not (train | val) & test  # the test fold trained and chose nothing
        assert [model for model, index in scored if index == test] == [second[4]]  # tested once: the refit head
        assert f.tested == "refit" and f.n_train == len(train) and f.refit["n_train"] == len(train | val)
        assert 0 <= f.selected["ua"] <= 1 and 0 <= f.refit["val_ua"] <= 1  # both validation figures
    plain = run_folds(data, folds, head, TrainConfig(**SMALL, linear_c=(0.1, 1.0)))
    assert [f.selected for f in plain.folds] == [f.selected for f in r.folds]  # the same choices
    assert all(f.tested == "selected" and f.refit == {} for f in plain.folds)
    assert "refit" in r.table() and "refit" not in plain.table()


def test_refit_with_selection_on_the_test_fold_is_refused():
    with pytest.raises(ConfigError, match="refit"):
        TrainConfig(refit=True, compat_select_on_test=True)


# --- seed ensembles --------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "qkv"])
def test_an_ensemble_of_one_is_the_plain_run(head):
    """The pinned run's settings (tests/test_pinned_run.py) with ensemble=1 spelt out give its
    pinned choices and probabilities: member 0 keeps the fold's seed."""
    pinned = json.loads((Path(__file__).parent / "data" / "pinned_run.json").read_text())[head]
    data = layer_data(n_speakers=6, per_speaker=8, seed=3)
    r = run_folds(data, folds_of(data), head, TrainConfig(**{**SMALL, "epochs": 8}, lr=3e-3, seed=1, ensemble=1))
    assert [{k: v for k, v in f.selected.items() if k != "ua"} for f in r.folds] == pinned["selected"]
    row = {u: i for i, u in enumerate(data.ids)}
    for f in r.folds:
        np.testing.assert_allclose(f.probs, np.asarray(pinned["probs"])[[row[u] for u in f.test_ids]], atol=1e-5)
        assert f.members == []


def test_an_ensemble_averages_members_that_choose_their_own_epochs(data, tmp_path):
    from ser_cache.heads import Ensemble

    folds, out = folds_of(data), tmp_path / "run"
    plain = run_folds(data, folds, "qkv", TrainConfig(**SMALL))
    r = run_folds(data, folds, "qkv", TrainConfig(**SMALL, ensemble=3), out)
    for f, p in zip(r.folds, plain.folds):
        seeds = [m["seed"] for m in f.members]
        assert len(set(seeds)) == 3 and seeds[0] == fold_seed(0, f.fold)  # member 0: the plain run's seed
        assert all(0 <= m["epoch"] < SMALL["epochs"] and len(m["history"]) == SMALL["epochs"] for m in f.members)
        model, info = load_head(out / f"fold_{f.fold}.pt")  # every member saved, in one file
        assert isinstance(model, Ensemble) and len(model.members) == 3 and info["members"] == 3
        x, mask = data.batch(folds.split(f.fold)[2])
        with torch.no_grad():
            members = [m(x, mask).softmax(-1).numpy() for m in model.members]
        np.testing.assert_allclose(f.probs, np.mean(members, axis=0), atol=1e-6)  # the mean of N members
        np.testing.assert_allclose(members[0], p.probs, atol=1e-6)  # member 0 is the plain head
    assert "ensembles of 3" in r.table()
    (out / "metrics.json").unlink()  # resumes from the saved ensembles: same results
    for name in ("fold_2.pt", "fold_2.json"):
        (out / name).unlink()
    assert run_folds(data, folds, "qkv", TrainConfig(**SMALL, ensemble=3), out).metrics == r.metrics


def test_a_refit_ensemble_retrains_each_member_with_its_own_epoch(data, monkeypatch):
    import ser_cache.ensembles as T

    real, fixed_calls = T.fit_head, []

    def fit_head(*args, fixed=None):
        if fixed is not None:
            fixed_calls.append((args[7], fixed))  # (seed, choice)
        return real(*args, fixed=fixed)

    monkeypatch.setattr(T, "fit_head", fit_head)
    r = run_folds(data, folds_of(data), "mean", TrainConfig(**SMALL, ensemble=2, refit=True))
    for k, f in enumerate(r.folds):
        assert f.tested == "refit" and len(f.members) == 2
        assert fixed_calls[2 * k : 2 * k + 2] == [(m["seed"], {"epoch": m["epoch"]}) for m in f.members]


# --- time masking -----------------------------------------------------------------------------------


def test_time_masking_drops_spans_of_real_frames_never_padding():
    """Kept frames are real frames of their own row, in order; padding (NaN here) is never
    kept or counted; every row keeps >= 1 frame; the dropped fraction is the one asked."""
    from ser_cache.batches import MASK_SPAN, drop_spans

    lengths = torch.tensor([40, 1, 2, 17, 9, 33])
    T = 45
    mask = torch.arange(T)[None, :] < lengths[:, None]
    x = torch.stack([torch.arange(T).float()[None, :].expand(6, -1), torch.arange(6).float()[:, None].expand(-1, T)], -1)
    x = x.masked_fill(~mask[..., None], float("nan"))  # (6, T, 2): frame number, row
    torch.manual_seed(0)
    for fraction in (0.2, 0.5, 0.95):
        dropped = []
        for _ in range(300):
            kept, new_mask = drop_spans(x, mask, fraction)
            n = new_mask.sum(1)
            assert (n >= 1).all() and (n <= lengths).all() and n[1] == 1  # a one-frame row keeps its frame
            assert torch.equal(new_mask, torch.arange(new_mask.shape[1])[None, :] < n[:, None])  # padding at the end
            assert (kept[~new_mask] == 0).all() and torch.isfinite(kept).all()  # no padded frame kept
            for row in range(6):
                frames = kept[row, : n[row], 0]
                assert (kept[row, : n[row], 1] == row).all() and (frames < lengths[row]).all()
                assert (frames[1:] > frames[:-1]).all()  # in their order, none twice
            dropped.append(1 - n[0].item() / 40)
            gone = sorted(set(range(40)) - set(kept[0, : n[0], 0].long().tolist()))
            runs = np.split(np.array(gone), np.flatnonzero(np.diff(gone) > 1) + 1) if gone else []
            # whole spans: a gap inside the row (not cut by its ends) is a multiple of MASK_SPAN
            assert all(len(r) % MASK_SPAN == 0 for r in runs if r[0] > 0 and r[-1] < 39), runs
        if fraction < 0.9:  # 40 frames, 4 or 5 spans: round(fraction * spans) at random, never all
            assert abs(np.mean(dropped) - fraction) < 0.03, (fraction, np.mean(dropped))


def test_time_masking_touches_training_batches_only(data, monkeypatch):
    import ser_cache.fitting as T

    folds, y = folds_of(data), data.classes()[1]
    train, val, test = folds.split(0)
    seen, real = [], T.drop_spans
    monkeypatch.setattr(T, "drop_spans", lambda x, mask, fraction: (seen.append(int(mask.shape[0])),
                                                                     real(x, mask, fraction))[1])
    cpu = torch.device("cpu")
    masked = fit_head("attentive", data, y, train, val, TrainConfig(**SMALL, time_mask=0.3), 3, 0, cpu)
    assert sum(seen) == SMALL["epochs"] * len(train)  # every training utterance once per epoch, nothing else
    seen.clear()
    plain = fit_head("attentive", data, y, train, val, TrainConfig(**SMALL), 3, 0, cpu)
    assert seen == []  # off by default: not even a random draw
    probs = predict_proba(masked.model, data, test, cpu)
    np.testing.assert_array_equal(probs, predict_proba(masked.model, data, test, cpu))  # evaluation: no masking
    assert not np.allclose(probs, predict_proba(plain.model, data, test, cpu))
    with pytest.raises(ConfigError, match="time_mask"):
        TrainConfig(time_mask=1.0)


# --- the reason for attention pooling ---------------------------------------------------------


@pytest.fixture(scope="module")
def needle_uas():
    """Test UA of each torch head on one speaker-independent split of the needle task.

    16 speakers x 30 utterances: train on 7 speakers, choose the epoch on 1, test on 8 (240
    utterances). Small heads (d_model 64) and lr 2e-3 over 20 epochs keep it to seconds. In
    development, over data and training seeds 0-9, mean pooling scored UA 0.27-0.47 (chance
    0.25), attentive 0.86-1.00 and QKV 0.74-0.96 (its tanh-bounded scores weigh a frame at
    most e^2 times another, so it cannot focus as sharply); the smallest margin over mean
    was 0.43, twice the 0.2 asserted."""
    data = needle_data(n_speakers=16, per_speaker=30, seed=0)
    y = np.searchsorted(sorted(set(data.labels)), data.labels)
    first_half = np.isin(data.speakers, [f"s{i}" for i in range(8)])
    folds = Folds(data.ids, data.speakers, np.where(first_half, 1, 0), [["s7"], ["s15"]], "file", 0)
    config = TrainConfig(epochs=20, lr=2e-3, d_model=64, device="cpu", seed=0)
    train, val, test = folds.split(0)
    cpu = torch.device("cpu")
    models = {head: fit_head(head, data, y, train, val, config, 4, fold_seed(0, 0), cpu).model
              for head in ("mean", "attentive", "qkv", "stats")}
    return {head: ua_of(y[test], predict_proba(m, data, test, cpu), 4) for head, m in models.items()}


@pytest.mark.parametrize("head", ["attentive", "qkv", "stats"])
def test_attention_finds_evidence_that_averaging_drowns(needle_uas, head):
    assert needle_uas[head] >= needle_uas["mean"] + 0.2, needle_uas


def test_cta_finds_evidence_that_averaging_drowns():
    """The CTA head (channel gate, frame gate, BiLSTM, attentive pooling) on the split of
    `needle_uas`, with 10 epochs to keep it to seconds. In development, over data and training
    seeds 0-9 with these settings, mean pooling scored UA 0.28-0.41 and cta 0.95-1.00; the
    smallest margin was 0.56, nearly twice the 0.3 asserted."""
    data = needle_data(n_speakers=16, per_speaker=30, seed=0)
    y = np.searchsorted(sorted(set(data.labels)), data.labels)
    first_half = np.isin(data.speakers, [f"s{i}" for i in range(8)])
    folds = Folds(data.ids, data.speakers, np.where(first_half, 1, 0), [["s7"], ["s15"]], "file", 0)
    config = TrainConfig(epochs=10, lr=2e-3, d_model=64, device="cpu", seed=0, compute_dtype="float32")
    train, val, test = folds.split(0)
    cpu = torch.device("cpu")
    ua = {head: ua_of(y[test], predict_proba(fit_head(head, data, y, train, val, config, 4, fold_seed(0, 0), cpu).model,
                                             data, test, cpu), 4)
          for head in ("mean", "cta")}
    assert ua["cta"] >= ua["mean"] + 0.3, ua


def test_cta_trains_under_bfloat16_arithmetic(data):
    """Its LSTMs run in float32 inside autocast; the rest follows --compute-dtype."""
    folds, y = folds_of(data), data.classes()[1]
    fit = fit_head("cta", data, y, folds.split(0)[0], None, TrainConfig(**{**SMALL, "compute_dtype": "bfloat16"}), 3,
                   0, torch.device("cpu"), fixed={"epoch": 0})
    assert fit.compute_dtype == "bfloat16" and np.isfinite(fit.history[0]["train_loss"])


# --- the command line ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_checkpoint):
    from conftest import write_corpus

    from ser_cache.encoder import load_encoder
    from ser_cache.extract import ExtractOptions, extract

    root = tmp_path_factory.mktemp("train-cli")
    records = write_corpus(root / "corpus", n_speakers=4, per_speaker=3)
    extract(records, root / "cache", "csv", load_encoder(str(tiny_checkpoint)), ExtractOptions(mode="trim", progress=False))
    return root / "cache"


def test_cli_train(tiny_cache, tmp_path):
    from ser_cache.cli import main

    def train(*args):
        return CliRunner().invoke(main, ["train", str(tiny_cache), *map(str, args)])

    out = tmp_path / "run"
    r = train("--layer", 1, "--head", "mean", "--out", out, "--folds", 2, "--epochs", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "mean ± std: UA" in r.output and (out / "metrics.json").is_file() and (out / "fold_1.pt").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["layer"] == 1 and config["folds"]["n_folds"] == 2 and config["cache"]
    r = train("--layer", 1, "--head", "mean", "--out", out, "--folds", 2)
    assert r.exit_code == 1 and "already holds a finished run" in r.output
    r = train("--layer", 99, "--head", "qkv", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "layer 99 is not in the cache" in r.output
    r = train("--layer", 1, "--head", "qkv", "--out", tmp_path / "c")  # default 5 folds, 4 speakers
    assert r.exit_code == 1 and "at most 4 folds" in r.output


def test_cli_train_passes_refit_ensemble_and_time_masking(tiny_cache, tmp_path):
    from ser_cache.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(tiny_cache), "--layer", "1", "--head", "cta", "--out", str(out),
                                  "--folds", "2", "--epochs", "2", "--device", "cpu", "--refit", "--ensemble", "2",
                                  "--time-mask", "0.2"])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["refit"], config["ensemble"], config["time_mask"]) == (True, 2, 0.2)
    fold = json.loads((out / "fold_0.json").read_text())
    assert fold["tested"] == "refit" and len(fold["members"]) == 2 and "ensembles of 2" in r.output


# --- crash safety of a run folder ---------------------------------------------------------------


def test_a_run_killed_between_folds_resumes_from_its_finished_folds(data, tmp_path, monkeypatch):
    """Killed (Ctrl-C) while training fold 2: the re-run keeps folds 0 and 1 as saved, trains
    only fold 2, and ends with the metrics and files of an uninterrupted run."""
    import ser_cache.training as T

    folds, config = folds_of(data), TrainConfig(**SMALL)
    whole = run_folds(data, folds, "qkv", config, tmp_path / "whole")
    real, trained = T.train_fold, []

    def killed_at_fold_2(data, y, folds, k, *args):
        if k == 2:
            raise KeyboardInterrupt
        trained.append(k)
        return real(data, y, folds, k, *args)

    out = tmp_path / "killed"
    monkeypatch.setattr(T, "train_fold", killed_at_fold_2)
    with pytest.raises(KeyboardInterrupt):
        run_folds(data, folds, "qkv", config, out)
    assert trained == [0, 1] and not (out / "metrics.json").exists()
    monkeypatch.setattr(T, "train_fold", lambda data, y, folds, k, *a: (trained.append(k), real(data, y, folds, k, *a))[1])
    resumed = run_folds(data, folds, "qkv", config, out)
    assert trained == [0, 1, 2]  # only the missing fold was trained again
    assert resumed.metrics == whole.metrics
    for name in ("metrics.json", "predictions.csv"):
        a, b = (json.loads((p / name).read_text()) if name.endswith(".json") else (p / name).read_text()
                for p in (out, tmp_path / "whole"))
        if name == "metrics.json":  # timings differ; everything else is the same
            for m in (a, b):
                m.pop("fold_details")
        assert a == b


def test_a_kill_while_writing_results_leaves_no_finished_looking_run(data, tmp_path):
    """A kill during the write of metrics.json leaves only a temporary: the run is not taken as
    finished, its re-run completes it, and the temporary is removed."""
    folds, config, out = folds_of(data), TrainConfig(**SMALL), tmp_path / "run"
    run_folds(data, folds, "mean", config, out)
    metrics = (out / "metrics.json").read_text()
    (out / "metrics.json").unlink()
    (out / "metrics.json.12345.tmp").write_text(metrics[: len(metrics) // 2])  # a write cut short
    again = run_folds(data, folds, "mean", config, out)
    assert json.loads((out / "metrics.json").read_text())["ua"] == again.metrics["ua"]
    assert not list(out.glob("*.tmp"))
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run_folds(data, folds, "mean", config, out)


def test_an_unfinished_run_with_other_settings_is_refused_not_mixed(data, tmp_path, monkeypatch):
    import ser_cache.training as T

    folds, out = folds_of(data), tmp_path / "run"
    real = T.train_fold
    monkeypatch.setattr(T, "train_fold", lambda data, y, folds, k, *a: real(data, y, folds, k, *a) if k == 0 else
                        (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_folds(data, folds, "mean", TrainConfig(**SMALL), out)
    monkeypatch.setattr(T, "train_fold", real)
    with pytest.raises(ConfigError, match=r"other settings:\n  config: run has .*'lr': 0.001"):
        run_folds(data, folds, "mean", TrainConfig(**SMALL, lr=3e-3), out)
    fresh = run_folds(data, folds, "mean", TrainConfig(**SMALL, lr=3e-3), out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 3e-3
    assert fresh.metrics == run_folds(data, folds, "mean", TrainConfig(**SMALL, lr=3e-3)).metrics


# --- patience and arithmetic ---------------------------------------------------------------------


def test_patience_stops_a_run_whose_validation_ua_is_flat(data, monkeypatch):
    folds, y = folds_of(data), data.classes()[1]
    train, val, _ = folds.split(0)
    monkeypatch.setattr(Classification, "score", lambda *a: 0.5)  # validation never improves on epoch 0
    fit = fit_head("mean", data, y, train, val, TrainConfig(**{**SMALL, "epochs": 10}, patience=3), 3, 0,
                   torch.device("cpu"))
    assert [h["epoch"] for h in fit.history] == [0, 1, 2, 3] and fit.selected["epoch"] == 0
    full = fit_head("mean", data, y, train, val, TrainConfig(**{**SMALL, "epochs": 10}), 3, 0, torch.device("cpu"))
    assert len(full.history) == 10  # patience 0: every epoch
    with pytest.raises(ConfigError, match="patience"):
        TrainConfig(patience=-1)


def test_bfloat16_training_agrees_with_float32(data):
    """bfloat16 products (float32 master weights and loss) train the same head to within
    rounding: the same predictions on nearly every test utterance."""
    folds, y = folds_of(data), data.classes()[1]
    train, _, test = folds.split(0)
    cpu = torch.device("cpu")
    probs = {}
    for dtype in ("float32", "bfloat16"):
        fit = fit_head("qkv", data, y, train, None, TrainConfig(**{**SMALL, "compute_dtype": dtype}), 3, 0, cpu,
                       fixed={"epoch": 2})
        assert fit.compute_dtype == dtype
        probs[dtype] = predict_proba(fit.model, data, test, cpu)
    assert np.abs(probs["float32"] - probs["bfloat16"]).max() < 0.05
    assert (probs["float32"].argmax(1) == probs["bfloat16"].argmax(1)).mean() >= 0.95
    assert not np.array_equal(probs["float32"], probs["bfloat16"])  # the arithmetic did change


def test_auto_arithmetic_is_measured_and_recorded(data):
    from ser_cache.fitting import faster_dtype

    faster_dtype.cache_clear()
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    chosen = faster_dtype("cpu")
    assert torch.equal(torch.rand(2), expected)  # measuring draws no random numbers
    assert chosen in (torch.float32, torch.bfloat16) and faster_dtype("cpu") is chosen  # measured once
    folds = folds_of(data)
    r = run_folds(data, folds, "mean", TrainConfig(**{**SMALL, "compute_dtype": "auto"}))
    assert {f.compute_dtype for f in r.folds} == {str(chosen).removeprefix("torch.")}


# --- several layers: evidence split across two states -----------------------------------------


def split_evidence_data(n_speakers=8, per_speaker=12, dim=4, frames=(20, 40), seed=0) -> LayerData:
    """4 classes whose evidence is split across two states stacked in each row (states 2 and
    5): state 2 tells {c0, c1} from {c2, c3} (a shift of its dimension 0), state 5 the parity,
    {c0, c2} from {c1, c3} (a shift of its dimension 1). Either state alone separates two
    pairs of classes and no more, so its UA is 0.5 at best; the two together name the class."""
    rng = np.random.default_rng(seed)
    n = n_speakers * per_speaker
    lengths = rng.integers(*frames, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = rng.normal(size=(lengths.sum(), 2 * dim)).astype(np.float32)
    classes = np.arange(n) % 4
    for i, c in enumerate(classes):
        x[offsets[i] : offsets[i + 1], 0] += 2.0 * (c // 2)  # state 2: which pair
        x[offsets[i] : offsets[i + 1], dim + 1] += 2.0 * (c % 2)  # state 5: the parity
    return LayerData(x, offsets, np.array([f"u{i:03d}" for i in range(n)]), np.array([f"c{c}" for c in classes]),
                     np.array([f"s{i // per_speaker}" for i in range(n)]), np.array([""] * n), layer=(2, 5))


def one_state(data: LayerData, j: int) -> LayerData:
    """State j of a multi-layer LayerData on its own (a single-layer LayerData)."""
    frames = np.ascontiguousarray(data.frames[:, j * data.dim : (j + 1) * data.dim])
    return LayerData(frames, data.offsets, data.ids, data.labels, data.speakers, data.groups, data.layers[j])


@pytest.fixture(scope="module")
def split_runs():
    data = split_evidence_data()
    folds = folds_of(data, n_folds=3)
    config = TrainConfig(**{**SMALL, "epochs": 10}, lr=5e-3, linear_c=(0.1, 1.0))
    inputs = {"both": data, "state 2": one_state(data, 0), "state 5": one_state(data, 1)}
    return {(name, head): run_folds(d, folds, head, config) for name, d in inputs.items() for head in ("mean", "linear")}


@pytest.mark.parametrize("head", ["mean", "linear"])
def test_a_multi_layer_head_solves_what_neither_layer_can(split_runs, head):
    ua = {name: split_runs[name, head].metrics["ua"]["mean"] for name in ("both", "state 2", "state 5")}
    # In development (data seeds 0-2): both states 0.94-0.99 (mean) and 0.90-0.97 (linear),
    # one state 0.42-0.57, about the 0.5 that telling two pairs apart gives.
    assert ua["both"] >= 0.85, ua
    assert ua["state 2"] <= 0.7 and ua["state 5"] <= 0.7, ua


def test_multi_layer_weights_are_recorded_per_fold(split_runs):
    mixed, probe = split_runs["both", "mean"], split_runs["both", "linear"]
    assert mixed.layer == (2, 5) and len(mixed.models[0].mix.logits) == 2
    for f in mixed.folds:
        assert len(f.layer_weights) == 2 and sum(f.layer_weights) == pytest.approx(1)
        assert f.layer_weights == pytest.approx(mixed.models[f.fold].layer_weights())
    assert "layer weights (softmax over states, per fold)" in mixed.table() and "state 5" in mixed.table()
    assert all(f.layer_weights is None for f in probe.folds) and "layer weights" not in probe.table()
    assert probe.models[0].weight.shape[1] == 2 * 2 * 4  # mean and std of both states
    assert split_runs["state 2", "mean"].folds[0].layer_weights is None


def test_a_multi_layer_run_folder_saves_and_resumes(tmp_path, monkeypatch):
    import ser_cache.training as T

    data = split_evidence_data(n_speakers=6, per_speaker=6)
    folds, config = folds_of(data), TrainConfig(**SMALL)
    whole = run_folds(data, folds, "attentive", config)
    real = T.train_fold
    monkeypatch.setattr(T, "train_fold", lambda data, y, folds, k, *a: real(data, y, folds, k, *a) if k < 2 else
                        (_ for _ in ()).throw(KeyboardInterrupt))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_folds(data, folds, "attentive", config, out)
    monkeypatch.setattr(T, "train_fold", real)
    resumed = run_folds(data, folds, "attentive", config, out)
    assert resumed.metrics == whole.metrics
    for a, b in zip(resumed.folds, whole.folds):
        assert a.layer_weights == pytest.approx(b.layer_weights)
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["layer"] == [2, 5] and config_json["head_kwargs"]["n_states"] == 2 and config_json["dim"] == 4
    record = json.loads((out / "fold_0.json").read_text())
    assert record["layer_weights"] == pytest.approx(whole.folds[0].layer_weights)
    assert json.loads((out / "metrics.json").read_text())["layer"] == [2, 5]
    head, info = load_head(out / "fold_2.pt")
    assert info["layer"] == [2, 5] and head.layer_weights() == pytest.approx(whole.folds[2].layer_weights)
    x, mask = data.batch(folds.split(2)[2])
    with torch.no_grad():
        np.testing.assert_allclose(head(x, mask).softmax(-1).numpy(), whole.folds[2].probs, atol=1e-5)
    other = LayerData(data.frames, data.offsets, data.ids, data.labels, data.speakers, data.groups, (2, 6))
    (out / "metrics.json").unlink()  # unfinished again: other layers must be refused, not mixed in
    with pytest.raises(ConfigError, match=r"layer: run has \[2, 5\], asked for \[2, 6\]"):
        run_folds(other, folds, "attentive", config, out)


def test_cli_train_on_several_layers(tiny_cache, tmp_path):
    from ser_cache.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(tiny_cache), "--layer", "1-2", "--head", "mean", "--out", str(out),
                                  "--folds", "2", "--epochs", "2", "--device", "cpu", "--compute-dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert "layer weights (softmax over states, per fold)" in r.output and "state 2" in r.output
    assert json.loads((out / "config.json").read_text())["layer"] == [1, 2]
    r = CliRunner().invoke(main, ["train", str(tiny_cache), "--layer", "1-x", "--head", "mean", "--out", str(out)])
    assert r.exit_code == 1 and "or several for one multi-layer head" in r.output
    r = CliRunner().invoke(main, ["train", str(tiny_cache), "--layer", "1+7+9", "--head", "mean", "--out", str(out)])
    assert r.exit_code == 1 and "layers [7, 9] are not in the cache" in r.output
