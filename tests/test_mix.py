"""The state mix of a multi-state head (heads.StateMix): its own learning rate moves it (mix_lr),
equal weights stay equal (mix "equal"), and every report says how far the weights are from
equal, and plainly when they stayed there."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import test_training
from ser_cache.cli import main
from ser_cache.config import ConfigError, TrainConfig
from ser_cache.ensembles import fit_members
from ser_cache.features import LayerData
from ser_cache.fitting import LR_SCALE, fit_head, member_seed, param_groups, settings_read
from ser_cache.heads import build_head
from ser_cache.report import SUMMARY_FILE, WEIGHTS_PLOT, load_sweep, mix_summary, mix_verdict, uniformity
from ser_cache.sweeping import SweepError, SweepSpec, head_settings, parse_grid, run_sweep
from ser_cache.training import run_folds
from test_training import SMALL, folds_of

tiny_cache = test_training.tiny_cache  # a fixture: a tiny extracted cache
CPU = torch.device("cpu")
CARRIER = 2  # the state that carries the label

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_state_carries(n_states=4, n_speakers=6, per_speaker=12, n_classes=3, dim=8, frames=(5, 15),
                      seed=0) -> LayerData:
    """n_states states of unit noise per frame, of which state CARRIER alone carries the class
    (a shift of 1 in its dimension c): a mix that learns should weigh that state most."""
    rng = np.random.default_rng(seed)
    n = n_speakers * per_speaker
    lengths = rng.integers(*frames, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = rng.normal(size=(lengths.sum(), n_states * dim)).astype(np.float32)
    classes = np.arange(n) % n_classes
    for i, c in enumerate(classes):
        x[offsets[i] : offsets[i + 1], CARRIER * dim + c] += 1.0
    return LayerData(x, offsets, np.array([f"u{i:03d}" for i in range(n)]), np.array([f"c{c}" for c in classes]),
                     np.array([f"s{i // per_speaker}" for i in range(n)]), np.array([""] * n),
                     layer=tuple(range(n_states)))


def trained_weights(data: LayerData, seed: int = 0, head: str = "mean", **settings) -> np.ndarray:
    """The mix weights after 10 epochs on every utterance (no epoch choice, so no selection noise)."""
    config = TrainConfig(**{**SMALL, "epochs": 10}, **settings)
    y = data.classes()[1]
    fit = fit_head(head, data, y, np.arange(len(y)), None, config, 3, seed, CPU, fixed={"epoch": 9})
    return np.array(fit.model.layer_weights())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_mix_lr_moves_the_weight_to_the_state_that_carries_the_label(seed):
    data = one_state_carries(seed=seed)
    default, learned, equal = (trained_weights(data, seed), trained_weights(data, seed, mix_lr=0.1),
                               trained_weights(data, seed, mix="equal"))
    # In development (seeds 0-2): the carrier's weight 0.91-0.94 with mix_lr 0.1, 0.26 by default.
    assert learned.argmax() == CARRIER and learned[CARRIER] > 0.6, learned
    assert not uniformity(learned)["uniform"] and uniformity(learned)["entropy"] < 0.8
    assert uniformity(default)["uniform"], default  # at the head's lr it hardly moves
    assert equal.tolist() == [0.25] * 4  # exactly: the logits never leave 0


def test_the_default_is_one_group_as_before_and_the_mix_lr_a_group_of_its_own():
    head = build_head("qkv", 8, 3, d_model=16, n_states=3)
    named = list(head.named_parameters())
    assert param_groups(named, TrainConfig()) == [p for _, p in named]  # the one group of before
    rest, mix = param_groups(named, TrainConfig(mix_lr=0.05, lr=1e-3, weight_decay=0.01))
    assert mix["params"] == [head.mix.logits] and mix["weight_decay"] == 0.0 and mix[LR_SCALE] == pytest.approx(50)
    assert len(rest["params"]) == len(named) - 1 and "weight_decay" not in rest  # the optimiser's defaults
    (only,) = param_groups(named, TrainConfig(mix="equal", mix_lr=0.05))
    assert all(p is not head.mix.logits for p in only["params"]) and len(only["params"]) == len(named) - 1
    single = list(build_head("qkv", 8, 3, d_model=16).named_parameters())
    assert param_groups(single, TrainConfig(mix_lr=0.05)) == [p for _, p in single]


def test_the_mix_lr_follows_the_schedule():
    data = one_state_carries()
    y = data.classes()[1]
    config = TrainConfig(**{**SMALL, "epochs": 4}, mix_lr=0.02)
    seen = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", step)
        fit_head("mean", data, y, np.arange(len(y)), None, config, 3, 0, CPU, fixed={"epoch": 3})
    for head_lr, mix_lr in seen:
        assert mix_lr == pytest.approx(head_lr * 20)
    assert len({round(lr, 12) for lr, _ in seen}) > 1  # warm-up and decay, the same for both


def test_mix_settings_are_no_ops_on_one_state_and_for_heads_that_do_not_mix():
    data = test_training.layer_data()
    y = data.classes()[1]
    train, val, _ = folds_of(data).split(0)
    fits = [fit_head("qkv", data, y, train, val, TrainConfig(**SMALL, **kw), 3, 0, CPU)
            for kw in ({}, {"mix_lr": 0.5}, {"mix": "equal"})]
    for fit in fits[1:]:
        assert fit.history == fits[0].history
        for k, v in fits[0].model.state_dict().items():
            assert torch.equal(v, fit.model.state_dict()[k]), k
    # What decides a result: the mix settings only where a head mixes several states.
    base, other = TrainConfig(), TrainConfig(mix_lr=0.1)
    assert settings_read("qkv", base, n_states=1) == settings_read("qkv", other, n_states=1)
    assert settings_read("qkv", base, n_states=7) != settings_read("qkv", other, n_states=7)
    assert settings_read("stats", base) == settings_read("stats", other)
    assert settings_read("qkv", TrainConfig(mix="equal"), n_states=7) == settings_read(
        "qkv", TrainConfig(mix="equal", mix_lr=0.1), n_states=7)


def test_a_stacked_ensemble_groups_the_mix_as_a_member_alone():
    data = one_state_carries(n_speakers=6, per_speaker=6)
    y = data.classes()[1]
    train, val, test = folds_of(data).split(0)
    for kw in ({"mix_lr": 0.1}, {"mix": "equal"}):
        config = TrainConfig(**{**SMALL, "epochs": 4, "dropout": 0.0}, ensemble=2, stack_members="on", **kw)
        fits = fit_members("mean", data, y, train, val, config, 3, 5, CPU)
        for m, fit in enumerate(fits):
            alone = fit_head("mean", data, y, train, val, config, 3, member_seed(5, m), CPU)
            assert fit.selected == alone.selected
            np.testing.assert_allclose(fit.model.layer_weights(), alone.model.layer_weights(), atol=1e-5)
        if kw.get("mix") == "equal":
            assert fits[0].model.layer_weights() == [0.25] * 4


@pytest.mark.parametrize("settings, message", [
    ({"mix_lr": 0.0}, "mix_lr must be > 0"), ({"mix_lr": -1e-3}, "mix_lr must be > 0"),
    ({"mix": "fixed"}, "mix must be one of"),
])
def test_bad_mix_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as e:
        TrainConfig(**settings)
    assert "\n" not in str(e.value)


def test_mix_lr_is_an_optional_number_in_configs_and_grids():
    assert TrainConfig.from_dict({"mix_lr": None}).mix_lr is None
    assert TrainConfig.from_dict({"mix_lr": 1}).mix_lr == 1.0
    with pytest.raises(ConfigError, match="'mix_lr' must be a number or None"):
        TrainConfig.from_dict({"mix_lr": "0.1"})
    grid = parse_grid(["mix=learned,equal mix_lr=none,1e-2"])
    assert grid == {"mix": ["learned", "equal"], "mix_lr": [None, 0.01]}
    assert head_settings("linear", grid, TrainConfig()) == head_settings("stats", grid, TrainConfig()) == [{}]
    assert len(head_settings("qkv", grid, TrainConfig())) == 4  # planned; on a layer, equal runs once
    with pytest.raises(SweepError, match="must be a number or none"):
        parse_grid(["mix_lr=fast"])
    with pytest.raises(ConfigError, match="mix must be one of"):
        head_settings("qkv", parse_grid(["mix=fixed"]), TrainConfig())


@pytest.mark.parametrize("args, message", [
    (["--mix-lr", "0"], "Invalid value for '--mix-lr'"), (["--mix", "fixed"], "Invalid value for '--mix'"),
])
def test_the_command_line_refuses_bad_mix_options(tmp_path, args, message):
    for command in (["train", str(tmp_path), "--layer", "1-2", "--head", "qkv", "--out", str(tmp_path / "r")],
                    ["sweep", str(tmp_path), "--out", str(tmp_path / "s")]):
        r = CliRunner().invoke(main, command + args)
        assert r.exit_code == 2 and message in r.output, r.output


def test_uniformity_and_its_verdict():
    assert uniformity([0.25] * 4) == {"max_dev": 0.0, "entropy": pytest.approx(1.0), "uniform": True}
    one = uniformity([1.0, 0.0, 0.0, 0.0])
    assert one["max_dev"] == pytest.approx(0.75) and one["entropy"] == pytest.approx(0.0) and not one["uniform"]
    assert uniformity([0.26, 0.25, 0.25, 0.24])["uniform"] and not uniformity([0.3, 0.25, 0.25, 0.2])["uniform"]
    assert "stayed uniform" in mix_verdict(["learned"] * 5, [True] * 5, 7)
    assert "shows no layer importance" in mix_verdict(["learned"] * 5, [True] * 5, 7)
    assert "left equal weights in 2 of 5 folds" in mix_verdict(["learned"] * 5, [True, False, True, False, True], 7)
    assert "equal weights, fixed (mix equal)" in mix_verdict(["equal"] * 3, [True] * 3, 7)
    records = [SimpleNamespace(head="mean", layer_weights=[0.25] * 4, values={"mix": "equal"}),
               SimpleNamespace(head="mean", layer_weights=[0.7, 0.1, 0.1, 0.1], values={})]
    s = mix_summary(records, {"mix": "learned"})
    assert s["max_dev"] == pytest.approx(0.45 / 2) and not s["uniform"] and "1 of 2 folds" in s["verdict"]
    assert mix_summary([SimpleNamespace(head="mean", layer_weights=None, values={})], {}) is None
    # the fusion head's weights are fixed by its own setting, equal by default, whatever the mix
    fusion = [SimpleNamespace(head="fusion", layer_weights=[0.25] * 4, values={})]
    assert "equal weights, fixed (fusion_weights equal)" in mix_summary(fusion, {"mix": "learned"})["verdict"]
    fusion = [SimpleNamespace(head="fusion", layer_weights=[0.25] * 4, values={"fusion_weights": "validation"})]
    assert "stayed uniform" in mix_summary(fusion, {})["verdict"]


def test_the_run_table_shows_the_distance_from_equal_weights():
    data = one_state_carries(n_speakers=6, per_speaker=6)
    folds = folds_of(data)
    configs = {kw: TrainConfig(**{**SMALL, "epochs": 4}, **dict([kw] if kw else []))
               for kw in (None, ("mix_lr", 0.3), ("mix", "equal"))}
    table = {kw: run_folds(data, folds, "mean", config).table() for kw, config in configs.items()}
    for text in table.values():
        assert "|w-1/L|" in text and "H/log L" in text
    assert "the learned mix stayed uniform" in table[None] and "shows no layer importance" in table[None]
    assert "left equal weights in" in table["mix_lr", 0.3]
    assert "equal weights, fixed (mix equal)" in table["mix", "equal"]
    assert "  0.0000   1.0000" in table["mix", "equal"]  # each fold: no distance, full entropy


def test_a_sweep_tries_each_mix_setting_where_it_decides_and_reports_the_distance(tiny_cache, tmp_path):
    out = tmp_path / "sweep"
    train = TrainConfig(epochs=2, n_heads=2, head_dim=2, linear_c=(1.0,), compute_dtype="float32")
    spec = SweepSpec(caches=[tiny_cache], layers="1,1+2", heads=["linear", "mean"], train=train, n_folds=2,
                     grid=parse_grid(["mix=learned,equal mix_lr=none,0.3"]))
    outcome = run_sweep(spec, out, jobs=1, progress=False)
    assert not outcome.failures
    for r in load_sweep(out).records:
        tried = [g["setting"] for g in r.grid]
        if r.head == "mean" and r.layer == [1, 2]:  # equal once: mix_lr decides nothing there
            assert tried == ["mix=learned mix_lr=None", "mix=learned mix_lr=0.3", "mix=equal mix_lr=None"]
        else:  # one state, or a head that reads the states side by side: one setting
            assert len(tried) == 1, (r.head, r.layer, tried)
    summary = (out / SUMMARY_FILE).read_text(encoding="utf-8")
    assert "|w − 1/L|" in summary and "H/log L" in summary and "- 1+2, mean: state 1 0." in summary
    assert (out / WEIGHTS_PLOT).stat().st_size > 10_000
    assert json.loads((out / "sweep.json").read_text())["config"]["train"]["mix_lr"] is None
