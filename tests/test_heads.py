"""Pooling heads: shapes, padding invariance, save/load round trips."""
import numpy as np
import pytest
import torch

from ser_cache.features import LayerData
from ser_cache.heads import HEADS, Ensemble, build_head, load_head, save_head
from ser_cache.config import TrainConfig
from ser_cache.fitting import fit_head

TORCH_HEADS = ["mean", "attentive", "qkv"]  # the pooling heads
DIM, N_CLASSES = 12, 5


def make_batch(B=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g)
    lengths = torch.tensor([T, 1, T - 3, 5])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return x.masked_fill(~mask[..., None], 0.0), mask


def test_registry_names():
    assert sorted(HEADS) == ["attentive", "cta", "fusion", "linear", "mean", "qkv", "stats"]
    with pytest.raises(ValueError, match="available heads"):
        build_head("transformer", DIM, N_CLASSES)


@pytest.mark.parametrize("name", TORCH_HEADS)
def test_shapes(name):
    head = build_head(name, DIM, N_CLASSES, d_model=32).eval()
    x, mask = make_batch()
    assert head(x, mask).shape == (4, N_CLASSES)
    assert head.pool(head.front(x), mask).shape == (4, head.pooled_dim)


def fresh(name):
    """A head of each kind with non-trivial numbers (the linear probe starts all zero)."""
    if name == "linear":
        g = torch.Generator().manual_seed(1)
        return build_head(name, DIM, N_CLASSES).from_fitted(
            torch.randn(2 * DIM, generator=g).numpy(), 1 + torch.rand(2 * DIM, generator=g).numpy(),
            torch.randn(N_CLASSES, 2 * DIM, generator=g).numpy(), torch.randn(N_CLASSES, generator=g).numpy(),
            np.arange(N_CLASSES)).eval()
    if name == "fusion":  # 3 states of DIM / 3, each its probe's, weighed unequally
        g = torch.Generator().manual_seed(1)
        head = build_head(name, DIM // 3, N_CLASSES, n_states=3)
        for probe in head.probes:
            probe.from_fitted(torch.randn(2 * DIM // 3, generator=g).numpy(), 1 + torch.rand(2 * DIM // 3, generator=g).numpy(),
                              torch.randn(N_CLASSES, 2 * DIM // 3, generator=g).numpy(),
                              torch.randn(N_CLASSES, generator=g).numpy(), np.arange(N_CLASSES))
        return head.set_weights([0.5, 0.3, 0.2]).eval()
    if name == "stats":  # no front, so no d_model
        return build_head(name, DIM, N_CLASSES).eval()
    return build_head(name, DIM, N_CLASSES, d_model=32).eval()


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("junk", ["noise", "huge", "nan"])
def test_padding_does_not_change_output(name, junk):
    """Appending padded frames (mask False) holding anything leaves the logits unchanged."""
    torch.manual_seed(0)
    head = fresh(name)
    x, mask = make_batch()
    extra = {"noise": torch.randn(4, 7, DIM), "huge": torch.full((4, 7, DIM), 1e6),
             "nan": torch.full((4, 7, DIM), float("nan"))}[junk]
    x2 = torch.cat([x, extra], dim=1)
    mask2 = torch.cat([mask, torch.zeros(4, 7, dtype=torch.bool)], dim=1)
    # also write junk into the existing padded positions
    x2[:, : x.shape[1]][~mask] = extra[:, :1].expand(-1, x.shape[1], -1)[~mask]
    with torch.no_grad():
        a, b = head(x, mask), head(x2, mask2)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_batch_equals_single(name):
    """An utterance gets the same logits alone as inside a padded batch."""
    head = fresh(name)
    x, mask = make_batch()
    with torch.no_grad():
        batched = head(x, mask)
        for i in range(4):
            n = int(mask[i].sum())
            alone = head(x[i : i + 1, :n], mask[i : i + 1, :n])
            torch.testing.assert_close(alone[0], batched[i], rtol=1e-5, atol=1e-5, check_dtype=False)


def test_sizes_are_options():
    head = build_head("attentive", DIM, N_CLASSES, d_model=16, n_heads=3, head_dim=8)
    assert head.pooled_dim == 24 and head.back[0].in_features == 24
    head = build_head("qkv", DIM, N_CLASSES, n_heads=2, head_dim=5)
    assert head.pooled_dim == 10 and head.front[0].out_features == 256


def test_dropout_only_in_training_mode():
    head = build_head("qkv", DIM, N_CLASSES, dropout=0.5)
    x, mask = make_batch()
    with torch.no_grad():
        head.eval()
        assert torch.equal(head(x, mask), head(x, mask))
        head.train()
        assert not torch.equal(head(x, mask), head(x, mask))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_round_trip(name, tmp_path):
    head = fresh(name)
    kwargs = head.options(TrainConfig(d_model=32), DIM, N_CLASSES)
    if name == "fusion":  # built from 3 states of DIM / 3 (fresh)
        kwargs = head.options(TrainConfig(), DIM // 3, N_CLASSES, n_states=3)
    labels = [f"c{i}" for i in range(N_CLASSES)]
    save_head(tmp_path / "h.pt", head, name, kwargs, labels, layer=3, fold=1)
    torch.load(tmp_path / "h.pt", weights_only=True)  # tensors and plain values only: no pickled code
    again, info = load_head(tmp_path / "h.pt")
    assert info["head"] == name and info["labels"] == labels and info["layer"] == 3 and info["fold"] == 1
    x, mask = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(head(x, mask), again(x, mask))


def test_an_ensemble_gives_the_mean_of_its_members_probabilities(tmp_path):
    """Its logits are log mean probabilities: softmax gives the mean back, padding changes
    nothing, and it saves and loads as one file."""
    torch.manual_seed(0)
    members = [fresh("qkv") for _ in range(3)]
    ensemble = Ensemble(members).eval()
    x, mask = make_batch()
    with torch.no_grad():
        mean = torch.stack([m(x, mask).softmax(-1) for m in members]).mean(0)
        torch.testing.assert_close(ensemble(x, mask).softmax(-1), mean)
        torch.testing.assert_close(ensemble(x, mask).exp(), mean)  # already normalised
        torch.testing.assert_close(Ensemble(members[:1])(x, mask).softmax(-1), members[0](x, mask).softmax(-1))
        padded = torch.cat([x, torch.full((4, 3, DIM), float("nan"))], 1)
        torch.testing.assert_close(ensemble(padded, torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1)),
                                   ensemble(x, mask))
    save_head(tmp_path / "e.pt", ensemble, "qkv", members[0].options(TrainConfig(d_model=32), DIM, N_CLASSES),
              ["a"] * N_CLASSES, layer=1)
    again, info = load_head(tmp_path / "e.pt")
    assert isinstance(again, Ensemble) and len(again.members) == 3 and info["members"] == 3 and info["head"] == "qkv"
    with torch.no_grad():
        torch.testing.assert_close(again(x, mask), ensemble(x, mask))


def test_an_ensemble_keeps_a_class_no_member_saw_at_probability_zero():
    probes = [fresh("linear") for _ in range(2)]
    for p in probes:
        p.bias[1] = -float("inf")  # class 1 absent from training
    x, mask = make_batch()
    with torch.no_grad():
        probs = Ensemble(probes)(x, mask).softmax(-1)
    assert torch.isfinite(probs).all() and (probs[:, 1] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, dtype=probs.dtype))


def test_cta_runs_each_lstm_direction_over_real_frames_only():
    """The forward direction at frame t has read frames 0..t; the backward one at the last
    real frame has read only that frame (its first step); padding is zero on the way out."""
    torch.manual_seed(0)
    head = build_head("cta", DIM, N_CLASSES, d_model=32).eval()
    h, mask = make_batch()  # widths: the LSTMs read d_model-wide frames
    h = torch.randn(4, mask.shape[1], 32).masked_fill(~mask[..., None], 0.0)
    hidden = head.rnn_forward.hidden_size
    with torch.no_grad():
        out = head.recur(h, mask)
        for row in range(4):
            n = int(mask[row].sum())
            forward, _ = head.rnn_forward(h[row : row + 1, :n])
            last, _ = head.rnn_backward(h[row : row + 1, n - 1 : n])
            torch.testing.assert_close(out[row, :n, :hidden], forward[0])
            torch.testing.assert_close(out[row, n - 1, hidden:], last[0, 0])
            assert (out[row, n:] == 0).all()


def test_cta_channel_gate_weighs_every_channel_of_a_frame_per_utterance():
    """One gate value per channel and utterance, from its real frames: the same module gates
    L stacked states flattened to L * d channels."""
    from ser_cache.heads import ChannelGate

    torch.manual_seed(0)
    layers, d = 3, DIM
    gate = ChannelGate(layers * d)
    x, mask = torch.randn(4, 9, layers * d), torch.ones(4, 9, dtype=torch.bool)
    mask[1, 4:] = False
    x = x.masked_fill(~mask[..., None], 0.0)
    with torch.no_grad():
        g = gate(x, mask) / x.where(x != 0, torch.ones(()))  # the gate, wherever x is not 0
        torch.testing.assert_close(g[0], g[0, :1].expand(9, -1))  # constant over time ...
        assert not torch.allclose(g[0, 0], g[2, 0])  # ... but not over utterances
        assert ((g[mask] > 0) & (g[mask] < 1)).all() and g.shape == (4, 9, layers * d)
        torch.testing.assert_close(gate(x[1:2, :4], mask[1:2, :4]), gate(x, mask)[1:2, :4])  # padding: no effect


def tiny_layer(n=30, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 8, size=n)
    labels = np.array([f"c{i % 3}" for i in range(n)])
    frames = rng.normal(size=(lengths.sum(), DIM)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(n):  # class evidence in the mean of frame dimension 0
        frames[offsets[i] : offsets[i + 1], 0] += 3 * (i % 3)
    ids = np.array([f"u{i}" for i in range(n)])
    return LayerData(frames, offsets, ids, labels, np.array(["s"] * n), np.array([""] * n), layer=2)


def test_frame_statistics():
    data = tiny_layer()
    feats = data.statistics
    assert feats.shape == (len(data), 2 * DIM)
    np.testing.assert_allclose(feats[4, :DIM], data.utterance(4).mean(0), rtol=1e-5)
    np.testing.assert_allclose(feats[4, DIM:], data.utterance(4).std(0), rtol=1e-5)


def test_linear_probe_gives_the_scikit_learn_pipelines_probabilities(tmp_path):
    """The probe is fitted by scikit-learn (StandardScaler + LogisticRegression, C chosen on
    validation) and computes, from padded frames, the probabilities that pipeline gives."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = tiny_layer()
    y = np.arange(len(data)) % 3
    train, val = np.arange(0, 20), np.arange(20, 30)
    fit = fit_head("linear", data, y, train, val, TrainConfig(linear_c=(0.1, 1.0)), 4, 0, torch.device("cpu"))
    assert fit.selected["C"] in (0.1, 1.0) and [h["C"] for h in fit.history] == [0.1, 1.0]
    x, mask = data.batch(np.arange(len(data)))
    with torch.no_grad():
        probs = fit.model(x, mask).softmax(-1).numpy()
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=fit.selected["C"], max_iter=2000))
    reference.fit(data.statistics[train], y[train])
    np.testing.assert_allclose(probs[:, :3], reference.predict_proba(data.statistics), atol=1e-10)
    assert (probs[:, 3] == 0).all()  # class 3 never seen in training: probability 0
    assert (probs.argmax(1) == y).mean() > 0.7  # chance is 1/3; trained on 20 of 30 utterances


def test_linear_probe_two_classes():
    """scikit-learn keeps one weight row for two classes; the probe still gives both."""
    data = tiny_layer()
    y = (np.arange(len(data)) % 3 > 0).astype(np.int64)
    fit = fit_head("linear", data, y, np.arange(30), None, TrainConfig(), 2, 0, torch.device("cpu"), fixed={"C": 1.0})
    x, mask = data.batch(np.arange(len(data)))
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(data.statistics, y)
    with torch.no_grad():
        np.testing.assert_allclose(fit.model(x, mask).softmax(-1).numpy(), reference.predict_proba(data.statistics),
                                   atol=1e-10)


def test_the_stats_head_without_attention_reads_the_linear_probes_features():
    """With no attention heads, the stats head is a linear map of the probe's standardised
    statistics: the probe's weights in its one layer give the probe's logits, whatever the
    frames' own standardisation (standardised statistics of standardised frames are the
    standardised statistics of the raw frames)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, size=20)
    frames = (rng.normal(size=(lengths.sum(), DIM)) * rng.uniform(0.5, 3, DIM) + rng.normal(size=DIM) * 4)
    data = LayerData(frames.astype(np.float32), np.concatenate([[0], np.cumsum(lengths)]), np.arange(20).astype(str),
                     np.array(["a", "b"] * 10), np.repeat(["s0", "s1"], 10), np.full(20, ""), 3)
    train = np.arange(14)
    head = build_head("stats", DIM, N_CLASSES, n_heads=0).eval()
    head.prepare(data, train, TrainConfig())
    stats = data.statistics[train]
    coef, intercept = rng.normal(size=(N_CLASSES, 2 * DIM)), rng.normal(size=N_CLASSES)
    probe = build_head("linear", DIM, N_CLASSES).from_fitted(stats.mean(axis=0), stats.std(axis=0), coef, intercept,
                                                             np.arange(N_CLASSES))
    with torch.no_grad():
        head.out.weight.copy_(torch.as_tensor(coef)), head.out.bias.copy_(torch.as_tensor(intercept))
        x, mask = data.batch(np.arange(20))
        torch.testing.assert_close(head(x, mask).double(),
                                   probe(x, mask), rtol=1e-4, atol=1e-4)


def test_input_standardisation_is_applied_and_saved():
    """standardize_inputs changes what the front sees and travels in the state dict."""
    torch.manual_seed(0)
    head = build_head("mean", dim=6, n_classes=3).eval()
    x, mask = torch.randn(2, 5, 6) * 3 + 7, torch.ones(2, 5, dtype=torch.bool)
    raw = head(x, mask)
    mean, std = x.reshape(-1, 6).mean(0).numpy(), x.reshape(-1, 6).std(0).numpy()
    head.standardize_inputs(mean, std)
    standardised = head(x, mask)
    assert not torch.allclose(raw, standardised)
    twin = build_head("mean", dim=6, n_classes=3).eval()
    twin.load_state_dict(head.state_dict())
    torch.testing.assert_close(twin(x, mask), standardised)
    # Same as feeding pre-standardised frames to an identity-standardised copy.
    plain = build_head("mean", dim=6, n_classes=3).eval()
    plain.load_state_dict({k: v for k, v in head.state_dict().items()} | {
        "input_mean": torch.zeros(6), "input_scale": torch.ones(6)})
    torch.testing.assert_close(plain((x - torch.tensor(mean)) / torch.tensor(std), mask), standardised, atol=1e-5, rtol=1e-5)


# --- several states per frame -------------------------------------------------------------------


def stacked_batch(n_states=3, seed=0):
    """make_batch's frames with n_states states side by side in each row: (B, T, n_states * DIM)."""
    g = torch.Generator().manual_seed(seed)
    x, mask = make_batch(seed=seed)
    x = torch.cat([x] + [torch.randn(x.shape, generator=g) for _ in range(n_states - 1)], dim=-1)
    return x.masked_fill(~mask[..., None], 0.0), mask


@pytest.mark.parametrize("name", TORCH_HEADS + ["cta"])
def test_a_multi_layer_head_starts_with_equal_weights_and_keeps_them_summing_to_one(name, tmp_path):
    head = build_head(name, DIM, N_CLASSES, d_model=32, n_states=3).eval()
    assert head.layer_weights() == pytest.approx([1 / 3] * 3)
    x, mask = stacked_batch()
    assert head(x, mask).shape == (4, N_CLASSES)
    with torch.no_grad():
        head.mix.logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
    weights = head.layer_weights()
    assert sum(weights) == pytest.approx(1) and weights[0] > weights[2] > weights[1]
    options = head.options(TrainConfig(d_model=32), DIM, N_CLASSES, 3)
    save_head(tmp_path / "h.pt", head, name, options, ["a"] * N_CLASSES, layer=(1, 2, 4))
    again, info = load_head(tmp_path / "h.pt")
    assert info["layer"] == [1, 2, 4] and info["kwargs"]["n_states"] == 3
    assert again.layer_weights() == pytest.approx(weights)  # the weights travel in the state dict
    with torch.no_grad():
        torch.testing.assert_close(again(x, mask), head(x, mask))


@pytest.mark.parametrize("name", TORCH_HEADS + ["cta"])
@pytest.mark.parametrize("junk", ["huge", "nan"])
def test_padding_does_not_change_a_multi_layer_heads_output(name, junk):
    torch.manual_seed(0)
    head = build_head(name, DIM, N_CLASSES, d_model=32, n_states=2).eval()
    x, mask = stacked_batch(2)
    fill = float("nan") if junk == "nan" else 1e6
    x2 = torch.cat([x, torch.full((4, 5, 2 * DIM), fill)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(head(x, mask), head(x2, mask2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TORCH_HEADS)
def test_one_state_has_no_mix_and_the_same_parameters_as_before(name):
    """A single-layer head has no layer weights at all: the same state dict, the same numbers."""
    single = build_head(name, DIM, N_CLASSES, d_model=32)
    assert single.mix is None and single.layer_weights() is None
    assert not any("mix" in k for k in single.state_dict())
    assert "n_states" not in single.options(TrainConfig(), DIM, N_CLASSES)
    # Two copies of one state, equally weighted, are that state: the multi-layer head with the
    # single head's weights gives the single head's logits.
    torch.manual_seed(0)
    single.eval()
    double = build_head(name, DIM, N_CLASSES, d_model=32, n_states=2).eval()
    state = single.state_dict()
    state.update(input_mean=state["input_mean"].repeat(2), input_scale=state["input_scale"].repeat(2),
                 **{"mix.logits": torch.zeros(2)})
    double.load_state_dict(state)
    x, mask = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(double(torch.cat([x, x], -1), mask), single(x, mask), rtol=1e-6, atol=1e-6)


def test_the_linear_probe_reads_every_state():
    options = HEADS["linear"].options(TrainConfig(), DIM, N_CLASSES, 3)
    assert options == {"dim": 3 * DIM, "n_classes": N_CLASSES}
    probe = build_head("linear", **options)
    assert probe.weight.shape == (N_CLASSES, 2 * 3 * DIM) and probe.weight.dtype == torch.float64
    x, mask = stacked_batch()
    assert probe(x, mask).dtype == torch.float64


@pytest.mark.parametrize("junk", ["huge", "nan"])
def test_the_stats_head_reads_every_state_side_by_side(junk):
    """Several states: every value of every state has its own statistics, attention means and
    weights (no mix, so no layer weights), and padding still changes nothing."""
    options = HEADS["stats"].options(TrainConfig(n_heads=2), DIM, N_CLASSES, 3)
    head = build_head("stats", **options).eval()
    assert head.layer_weights() is None and head.out.in_features == (2 + 2) * 3 * DIM
    x, mask = stacked_batch()
    x2 = torch.cat([x, torch.full((4, 5, 3 * DIM), float("nan") if junk == "nan" else 1e6)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(head(x, mask), head(x2, mask2), rtol=1e-5, atol=1e-5)
