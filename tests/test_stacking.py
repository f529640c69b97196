"""Ensemble members trained as one stacked model (ensembles.py): each member is the head it
would be alone, padding changes nothing, and runs stay reproducible and resumable."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import ser_cache.training as T
from ser_cache.batches import predict_proba
from ser_cache.features import LayerData
from ser_cache.heads import HEADS, QKVPoolHead
from ser_cache.config import TrainConfig
from ser_cache.ensembles import Stack, fit_members, fit_stacked, pad_stack, stacks
from ser_cache.fitting import fit_head, member_seed
from ser_cache.training import run_folds

import test_training
from test_training import SMALL, folds_of, layer_data

tiny_cache = test_training.tiny_cache  # a fixture: a tiny extracted cache
CPU = torch.device("cpu")
# Batches of 7 leave a short last batch (padded rows); lengths 5-15 frames (padded frames).
EXACT = dict(SMALL, dropout=0.0, batch_size=7, ensemble=3, stack_members="on")


# Tiny heads train fastest, and reproducibly, on one torch thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return layer_data()


def two_states(data: LayerData) -> LayerData:
    """The same utterances with a second state per frame (the frames negated and shifted)."""
    return dataclasses.replace(data, frames=np.concatenate([data.frames, 1.0 - data.frames], axis=1), layer=(1, 2))


def assert_same_fit(stacked, alone, data, test):
    assert stacked.selected == alone.selected  # same epoch, same validation UA
    assert [h["epoch"] for h in stacked.history] == [h["epoch"] for h in alone.history]
    assert [h["select_ua"] for h in stacked.history] == [h["select_ua"] for h in alone.history]
    np.testing.assert_allclose([h["train_loss"] for h in stacked.history],
                               [h["train_loss"] for h in alone.history], rtol=1e-5)
    np.testing.assert_allclose(predict_proba(stacked.model, data, test, CPU),
                               predict_proba(alone.model, data, test, CPU), atol=1e-5)


@pytest.mark.parametrize("head, states", [("qkv", 1), ("attentive", 1), ("mean", 1), ("qkv", 2)])
def test_a_stacked_member_is_the_member_trained_alone(data, head, states):
    """No dropout, no time masking: each member of a stack chooses the epoch, reaches the
    validation UA and gives the test probabilities of the same seed's head trained alone."""
    data = two_states(data) if states == 2 else data
    y = data.classes()[1]
    train, val, test = folds_of(data).split(0)
    config = TrainConfig(**{**EXACT, "epochs": 4})
    fits = fit_members(head, data, y, train, val, config, 3, 11, CPU)
    for m, fit in enumerate(fits):
        assert_same_fit(fit, fit_head(head, data, y, train, val, config, 3, member_seed(11, m), CPU), data, test)
    if states == 2:
        assert fits[0].model.layer_weights() != fits[1].model.layer_weights()


def test_each_member_stops_on_its_own_patience_and_keeps_its_best_state(data):
    """With patience, members stop at different epochs; a stopped member leaves the stack
    and its best state is what it would be alone."""
    y = data.classes()[1]
    train, val, test = folds_of(data).split(0)
    config = TrainConfig(**{**EXACT, "epochs": 12, "lr": 3e-2, "ensemble": 4}, patience=2)
    fits = fit_members("qkv", data, y, train, val, config, 3, 3, CPU)
    assert len({len(f.history) for f in fits}) > 1  # they did stop at different epochs
    for m, fit in enumerate(fits):
        alone = fit_head("qkv", data, y, train, val, config, 3, member_seed(3, m), CPU)
        assert_same_fit(fit, alone, data, test)
        assert len(fit.history) == 12 or len(fit.history) - 1 - fit.selected["epoch"] == 2


def test_padding_never_changes_a_members_outputs():
    """Members' batches of different sizes and lengths, padded into one stack, give each
    member's own logits on its own batch; padded rows stay finite."""
    torch.manual_seed(0)
    models = [QKVPoolHead(6, 3, d_model=8, n_heads=2, head_dim=4, dropout=0.0).eval() for _ in range(3)]
    shapes = [(5, 9), (7, 4), (2, 12)]  # (rows, frames)
    batches = []
    for rows, frames in shapes:
        lengths = torch.randint(1, frames + 1, (rows,))
        lengths[0] = frames
        mask = torch.arange(frames)[None, :] < lengths[:, None]
        batches.append((torch.randn(rows, frames, 6).masked_fill(~mask[..., None], 0.0), mask))
    z, mask = pad_stack(batches)
    assert z.shape == (3, 7, 12, 6) and mask.shape == (3, 7, 12)
    stack = Stack(models, TrainConfig(dropout=0.0), CPU, torch.float32)
    stack.base.eval()
    with torch.no_grad():
        logits = stack.logits(z, mask)
        for m, ((x, mk), model) in enumerate(zip(batches, models)):
            torch.testing.assert_close(logits[m, : len(x)], model.logits(x, mk), atol=1e-6, rtol=1e-5)
    assert torch.isfinite(logits).all()


def test_with_dropout_every_member_learns_and_members_differ(data):
    y = data.classes()[1]
    train, val, test = folds_of(data).split(0)
    config = TrainConfig(**{**SMALL, "epochs": 6}, dropout=0.3, ensemble=3, stack_members="on")
    fits = fit_members("attentive", data, y, train, val, config, 3, 0, CPU)
    assert all(f.selected["ua"] > 1 / 3 + 0.2 for f in fits)  # chance is 1/3
    probs = [predict_proba(f.model, data, test, CPU) for f in fits]
    assert not np.allclose(probs[0], probs[1]) and not np.allclose(probs[1], probs[2])


def test_a_stacked_ensemble_run_is_reproducible_and_resumes_identically(data, tmp_path):
    folds, out = folds_of(data), tmp_path / "run"
    config = TrainConfig(**SMALL, ensemble=3, stack_members="on", time_mask=0.2)  # dropout and masking on
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = run_folds(data, folds, "qkv", config, out)
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is untouched
    b = run_folds(data, folds, "qkv", config)
    assert a.metrics == b.metrics and all(len(f.members) == 3 for f in a.folds)
    for fa, fb in zip(a.folds, b.folds):
        np.testing.assert_array_equal(fa.probs, fb.probs)
        assert fa.members == fb.members
    (out / "metrics.json").unlink()
    for name in ("fold_1.pt", "fold_1.json"):
        (out / name).unlink()
    resumed = run_folds(data, folds, "qkv", config, out)
    assert resumed.metrics == a.metrics
    np.testing.assert_array_equal(resumed.folds[1].probs, a.folds[1].probs)


def test_a_stacked_refit_retrains_each_member_to_its_own_epoch(data):
    """refit: members stacked with their own fixed epochs equal the members refit alone."""
    folds = folds_of(data)
    config = TrainConfig(**{**EXACT, "epochs": 4, "ensemble": 2}, refit=True)
    stacked = run_folds(data, folds, "mean", config)
    alone = run_folds(data, folds, "mean", dataclasses.replace(config, stack_members="off"))
    for s, a in zip(stacked.folds, alone.folds):
        assert s.tested == "refit" and [(m["seed"], m["epoch"]) for m in s.members] == [
            (m["seed"], m["epoch"]) for m in a.members]
        assert s.refit["val_ua"] == a.refit["val_ua"]
        np.testing.assert_allclose(s.probs, a.probs, atol=1e-5)


def test_which_heads_and_devices_stack(data, monkeypatch):
    on, auto = TrainConfig(ensemble=2, stack_members="on"), TrainConfig(ensemble=2)
    assert [name for name, cls in sorted(HEADS.items()) if stacks(cls, on, CPU)] == ["attentive", "mean", "qkv"]
    assert not stacks(HEADS["qkv"], auto, CPU) and stacks(HEADS["qkv"], auto, torch.device("cuda"))
    assert not stacks(HEADS["qkv"], TrainConfig(ensemble=1, stack_members="on"), CPU)
    assert not stacks(HEADS["qkv"], TrainConfig(ensemble=2, stack_members="off"), torch.device("cuda"))
    with pytest.raises(T.ConfigError, match="stack_members must be one of"):
        TrainConfig(stack_members="yes")
    # The heads that cannot stack keep the sequential path whatever the setting.
    monkeypatch.setattr("ser_cache.ensembles.fit_stacked", lambda *a, **k: pytest.fail("stacked"))
    y = data.classes()[1]
    train, val, _ = folds_of(data).split(0)
    assert len(fit_members("linear", data, y, train, val, on, 3, 0, CPU)) == 2


def test_a_non_finite_loss_in_a_stack_stops_with_a_clear_error(data):
    with pytest.raises(T.NonFiniteLossError, match=r"fold 0, epoch 0, ensemble member \d: .*lower the learning rate"):
        run_folds(data, folds_of(data), "mean", TrainConfig(**SMALL, lr=1e30, ensemble=2, stack_members="on"))


def test_the_loss_and_score_are_the_callers(data):
    """fit_stacked trains on the loss it is given and chooses by the score it is given."""
    y = data.classes()[1]
    train, val, _ = folds_of(data).split(0)
    config = TrainConfig(**{**EXACT, "epochs": 3, "ensemble": 2})
    calls = []

    def score(truth, probs):
        calls.append(len(truth))
        return -len(calls)  # worse every time: the first epoch is kept

    fits = fit_stacked(HEADS["mean"], data, y, train, val, config, 3, [1, 2], CPU,
                       loss=nn.CrossEntropyLoss(label_smoothing=0.5), score=score)
    assert calls == [len(val)] * 6 and [f.selected["epoch"] for f in fits] == [0, 0]


def test_a_run_folder_from_before_stacking_resumes(data, tmp_path):
    """A stored config without stack_members was made with today's default ("auto": on a
    CPU, members one after another), so it resumes with the default."""
    folds, out = folds_of(data), tmp_path / "run"
    config = TrainConfig(**SMALL, ensemble=2)
    whole = run_folds(data, folds, "mean", config, out)
    stored = json.loads((out / "config.json").read_text())
    del stored["config"]["stack_members"]
    (out / "config.json").write_text(json.dumps(stored))
    for name in ("metrics.json", "fold_2.pt", "fold_2.json"):
        (out / name).unlink()
    assert run_folds(data, folds, "mean", config, out).metrics == whole.metrics


def test_cli_stacks_an_ensemble_reproducibly(tiny_cache, tmp_path):
    from click.testing import CliRunner

    from ser_cache.cli import main

    def train(out, *extra):
        r = CliRunner().invoke(main, ["train", str(tiny_cache), "--layer", "1", "--head", "qkv", "--out", str(out),
                                      "--folds", "2", "--epochs", "2", "--device", "cpu", "--ensemble", "3",
                                      "--stack-members", "on", *extra])
        assert r.exit_code == 0, r.output
        return json.loads((out / "metrics.json").read_text())

    a, b = train(tmp_path / "a"), train(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["config"]["stack_members"] == "on"
    assert a["ua"] == b["ua"] and (tmp_path / "a" / "predictions.csv").read_text() == (
        tmp_path / "b" / "predictions.csv").read_text()
    assert [len(f["members"]) for f in a["fold_details"]] == [3, 3]
