"""The fusion head (heads.FusionProbe, fitting.fit_fusion): one probe per state, their
probabilities combined with weights chosen on validation speakers only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ser_cache.batches import predict_proba
from ser_cache.config import TrainConfig
from ser_cache.ensembles import fit_selected, refit_selected
from ser_cache.exporting import export_run
from ser_cache.features import LayerData
from ser_cache.fitting import fit_head, fusion_weights
from ser_cache.heads import load_head, save_head
from ser_cache.predict import load_exported
from ser_cache.tasks import Classification, Regression
from ser_cache.training import run_folds, train_from_cache
import test_training
from test_mix import CARRIER, one_state_carries
from test_tasks import REGRESS, target_data
from test_training import folds_of

tiny_cache = test_training.tiny_cache  # a fixture: a tiny extracted cache

CPU = torch.device("cpu")
VALIDATION = TrainConfig(fusion_weights="validation")  # weights chosen on the validation speakers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data() -> LayerData:
    return one_state_carries(n_speakers=8)


def split(data: LayerData):
    """(train, validation, test): speakers s0-s4, s5-s6, s7."""
    at = lambda *names: np.where(np.isin(data.speakers, names))[0]  # noqa: E731
    return at("s0", "s1", "s2", "s3", "s4"), at("s5", "s6"), at("s7")


def test_the_state_that_carries_the_label_gets_the_weight(data):
    train, val, _ = split(data)
    fit = fit_head("fusion", data, data.classes()[1], train, val, VALIDATION, 3, 0, CPU)
    weights = np.array(fit.selected["weights"])
    assert weights.argmax() == CARRIER and weights[CARRIER] > 0.9, weights
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1)
    assert fit.model.layer_weights() == pytest.approx(weights.tolist())
    assert [h["C"] for h in fit.history] == list(TrainConfig().linear_c)  # every C scored on validation
    assert fit.selected["ua"] == max(h["select_ua"] for h in fit.history)


def test_equal_weights_are_the_default(data):
    train, val, _ = split(data)
    fit = fit_head("fusion", data, data.classes()[1], train, val, TrainConfig(), 3, 0, CPU)
    assert fit.selected["weights"] == pytest.approx([0.25] * 4)
    assert fit.selected["ua"] == max(h["select_ua"] for h in fit.history)


def test_the_weights_are_chosen_on_validation_only(data):
    """Scrambling the test speaker's frames and labels changes nothing that was chosen;
    scrambling the validation labels does (so the check can fail)."""
    train, val, test = split(data)
    y = data.classes()[1]
    fit = lambda d, labels: fit_head("fusion", d, labels, train, val, VALIDATION, 3, 0, CPU)  # noqa: E731
    before = fit(data, y)
    rng = np.random.default_rng(1)
    frames = data.frames.copy()
    rows = np.concatenate([np.arange(data.offsets[i], data.offsets[i + 1]) for i in test])
    frames[rows] = rng.normal(size=(len(rows), frames.shape[1]))
    scrambled = LayerData(frames, data.offsets, data.ids, data.labels, data.speakers, data.groups, layer=data.layer)
    y_test = y.copy()
    y_test[test] = rng.permutation(y[test])
    assert fit(scrambled, y_test).selected == before.selected
    y_val = y.copy()
    y_val[val] = (y[val] + 1) % 3
    assert fit(data, y_val).selected != before.selected


def test_frames_and_statistics_give_the_same_fused_probabilities(data):
    train, val, test = split(data)
    model = fit_head("fusion", data, data.classes()[1], train, val, VALIDATION, 3, 0, CPU).model
    probs = predict_proba(model, data, test, CPU)  # from the statistics
    x, mask = data.batch(test)
    with torch.no_grad():
        from_frames = torch.softmax(model(x, mask), dim=-1).numpy()
    np.testing.assert_allclose(from_frames, probs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_one_state_is_the_linear_probe(data):
    train, val, test = split(data)
    one = LayerData(np.ascontiguousarray(data.frames[:, CARRIER * data.dim:(CARRIER + 1) * data.dim]),
                    data.offsets, data.ids, data.labels, data.speakers, data.groups, layer=CARRIER)
    y = one.classes()[1]
    fusion = fit_head("fusion", one, y, train, val, TrainConfig(), 3, 0, CPU)
    linear = fit_head("linear", one, y, train, val, TrainConfig(), 3, 0, CPU)
    assert fusion.selected["C"] == linear.selected["C"] and fusion.selected["weights"] == [1.0]
    np.testing.assert_allclose(predict_proba(fusion.model, one, test, CPU), predict_proba(linear.model, one, test, CPU),
                               rtol=0, atol=1e-12)


def test_refit_and_a_saved_head_keep_the_weights(data, tmp_path):
    train, val, test = split(data)
    y = data.classes()[1]
    chosen = fit_selected("fusion", data, y, train, val, VALIDATION, 3, 0, CPU)
    refit = refit_selected(chosen, "fusion", data, y, train, val, VALIDATION, 3, 0, CPU)
    assert refit.model.layer_weights() == pytest.approx(chosen.selected["weights"])
    assert refit.refit["n_train"] == len(train) + len(val)
    save_head(tmp_path / "h.pt", refit.model, "fusion", {"dim": data.dim, "n_classes": 3, "n_states": 4},
              ["c0", "c1", "c2"], data.layer)
    loaded, _ = load_head(tmp_path / "h.pt")
    np.testing.assert_allclose(predict_proba(loaded, data, test, CPU), predict_proba(refit.model, data, test, CPU),
                               rtol=0, atol=0)


def test_weights_fit_the_validation_outputs():
    """Two states: one right on every utterance, one uniform; a third that is confidently
    wrong. The likelihood puts the weight on the first; equal outputs keep equal weights."""
    y = np.array([0, 1, 2, 0, 1, 2])
    right = np.eye(3)[y] * 0.9 + 0.1 / 3
    uniform = np.full((6, 3), 1 / 3)
    wrong = np.eye(3)[(y + 1) % 3] * 0.9 + 0.1 / 3
    w = fusion_weights(np.stack([right, uniform, wrong]), y, Classification(["a", "b", "c"]))
    assert w[0] > 0.99 and w.sum() == pytest.approx(1)
    assert fusion_weights(np.stack([right, right]), y, Classification(["a", "b", "c"])) == pytest.approx([0.5, 0.5])
    values = np.stack([np.arange(6.0)[:, None], np.zeros((6, 1))])
    w = fusion_weights(values, np.arange(6.0), Regression(["arousal"]))
    assert w[0] > 0.99


def test_a_regression_fusion_weighs_the_state_that_carries_the_targets():
    data = target_data()  # state 3 carries arousal and valence, state 7 is noise
    result = run_folds(data, folds_of(data), "fusion", TrainConfig(linear_c=(0.1, 1.0), fusion_weights="validation",
                                                                   **REGRESS))
    weights = np.array([f.layer_weights for f in result.folds])
    assert (weights[:, 0] > 0.8).all(), weights
    for f in result.folds:  # fused values on the targets' own scale
        assert abs(f.probs[:, 0].mean() - 4) < 0.8 and abs(f.probs[:, 1].mean() + 2) < 0.3
    assert result.metrics["targets"]["arousal"]["ccc"]["mean"] > 0.8


def test_an_exported_fusion_uses_the_folds_mean_weights(tiny_cache, tmp_path):
    run = tmp_path / "run"
    result = train_from_cache(tiny_cache, "0-2", "fusion", run, TrainConfig(linear_c=(0.1, 1.0), fusion_weights="validation"),
                              protocol="kfold", n_folds=2)
    export_run(run, tmp_path / "fusion.pt")
    exported = load_exported(tmp_path / "fusion.pt")
    folds_weights = [f.selected["weights"] for f in result.folds]
    assert exported.provenance["choice"]["weights"] == pytest.approx(np.mean(folds_weights, axis=0).tolist())
    assert exported.model.layer_weights() == pytest.approx(exported.provenance["choice"]["weights"])
    assert exported.provenance["choice"]["C"] in (0.1, 1.0)


def test_a_grid_of_fusion_weights_is_two_settings_on_several_states_and_one_on_one():
    from ser_cache.sweeping import head_settings, parse_grid
    from ser_cache.training import distinct_settings

    settings = head_settings("fusion", parse_grid(["fusion_weights=equal,validation"]), TrainConfig())
    assert settings == [{"fusion_weights": "equal"}, {"fusion_weights": "validation"}]
    assert len(distinct_settings("fusion", TrainConfig(), settings, n_states=7)) == 2
    assert len(distinct_settings("fusion", TrainConfig(), settings, n_states=1)) == 1
    assert head_settings("linear", parse_grid(["fusion_weights=equal,validation"]), TrainConfig()) == [{}]
