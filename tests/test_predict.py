"""Export and predict: one self-contained file; prediction sees what training saw.

A tiny random Whisper and a synthetic corpus: the numbers mean nothing, the invariants do
(probabilities sum to 1, early stop changes nothing, states equal the cache's, refusals).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from ser_cache.audio import load_utterance
from ser_cache.cache import open_cache
from ser_cache.cli import main
from ser_cache.encoder import load_encoder
from ser_cache.extract import ExtractOptions, extract
from ser_cache.heads import load_head
from ser_cache.exporting import ExportError, export_run
from ser_cache.predict import PredictError, load_exported, load_predictor
from ser_cache.config import TrainConfig
from ser_cache.training import train_from_cache

from conftest import make_checkpoint, tone, write_corpus

LAYER = 1  # of the tiny model's states 0..2: a block in the middle, so early stop skips one
SMALL = dict(epochs=3, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return root, write_corpus(root / "corpus", n_speakers=6, per_speaker=4)


def make_cache(root, records, checkpoint, mode):
    out = root / f"cache-{mode}"
    if not out.exists():
        extract(records, out, "csv", load_encoder(str(checkpoint)), ExtractOptions(mode=mode, progress=False))
    return out


def make_run(root, cache, head):
    out = root / f"run-{cache.name}-{head}"
    if not out.exists():
        train_from_cache(cache, LAYER, head, out, TrainConfig(**SMALL), protocol="kfold", n_folds=3)
    return out


@pytest.fixture(scope="module")
def runs(corpus, tiny_checkpoint):
    root, records = corpus
    cache = make_cache(root, records, tiny_checkpoint, "trim")
    return {head: make_run(root, cache, head) for head in ("qkv", "linear")}


@pytest.fixture(scope="module")
def exported(runs, corpus):
    root, _ = corpus
    out = {}
    for head, run in runs.items():
        out[head] = root / f"{head}.pt"
        export_run(run, out[head])
    return out


def test_export_all_speakers_records_what_predict_needs(exported, runs, tiny_checkpoint):
    enc = load_encoder(str(tiny_checkpoint))
    config = json.loads((runs["qkv"] / "config.json").read_text())
    ex = load_exported(exported["qkv"])
    assert ex.head == "qkv" and ex.layer == LAYER and ex.labels == config["labels"]
    assert ex.mode == "trim" and ex.dtype == "float16"
    # the checkpoint's path travels cache.json -> the run's config.json -> the exported file
    assert config["cache"]["model_path"] == str(tiny_checkpoint.absolute())
    assert ex.encoder == {"family": "openai-whisper", "name": enc.name, "sha256": enc.sha256, "dims": enc.dims, "path": config["cache"]["model_path"]}
    p = ex.provenance
    assert p["trained_on"] == "all speakers" and p["n_utterances"] == 24
    selected = sorted(s["epoch"] for s in p["selected_per_fold"])
    assert p["epochs"] == selected[1] + 1 and p["schedule_epochs"] == 3  # median of 3 folds
    assert isinstance(ex.model, torch.nn.Module) and not ex.model.training


def test_export_fold_keeps_the_saved_head(runs, tmp_path):
    export_run(runs["qkv"], tmp_path / "f1.pt", fold=1)
    ex = load_exported(tmp_path / "f1.pt")
    saved, info = load_head(runs["qkv"] / "fold_1.pt")
    assert ex.provenance["trained_on"] == "fold 1" and ex.provenance["selected"] == info["selected"]
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(ex.model.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ExportError, match="no saved head for fold 7"):
        export_run(runs["qkv"], tmp_path / "f7.pt", fold=7)
    with pytest.raises(ExportError, match="exists"):
        export_run(runs["qkv"], tmp_path / "f1.pt", fold=1)


def test_linear_head_exports_like_any_head(runs, exported, corpus, tmp_path):
    export_run(runs["linear"], tmp_path / "lin0.pt", fold=0)
    saved, _ = load_head(runs["linear"] / "fold_0.pt")
    ex = load_exported(tmp_path / "lin0.pt")
    data = open_cache(corpus[0] / "cache-trim").read_layer(LAYER)
    x, mask = data.batch(np.arange(len(data)))
    with torch.no_grad():
        torch.testing.assert_close(ex.model(x, mask), saved(x, mask), rtol=0, atol=0)
    p = load_exported(exported["linear"]).provenance
    assert p["trained_on"] == "all speakers" and p["choice"]["C"] in [s["C"] for s in p["selected_per_fold"]]


def test_export_refuses_a_cache_with_other_states(runs, corpus, tiny_checkpoint, tmp_path):
    root, records = corpus
    other = make_cache(root, records, tiny_checkpoint, "short")
    with pytest.raises(ExportError, match="mode: run has 'trim', cache has 'short'"):
        export_run(runs["qkv"], tmp_path / "m.pt", cache_path=other)


def test_export_cli_and_explicit_epochs(runs, tmp_path):
    result = invoke("export", runs["qkv"], "--out", tmp_path / "m.pt", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "trained on all speakers" in result.output and "2 epochs" in result.output
    assert load_exported(tmp_path / "m.pt").provenance["schedule_epochs"] == 2
    result = invoke("export", runs["qkv"], "--out", tmp_path / "n.pt", "--epochs", "2", "--fold", "0")
    assert result.exit_code != 0 and "--fold" in result.output
    with pytest.raises(ExportError, match="median C"):
        export_run(runs["linear"], tmp_path / "l.pt", epochs=2)


@pytest.mark.parametrize("head", ["qkv", "linear"])
def test_predict_prints_a_label_and_probabilities_that_sum_to_one(exported, corpus, tiny_checkpoint, head):
    _, records = corpus
    files = [records[0].path, records[5].path]
    result = invoke("predict", exported[head], *files, "--model", tiny_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    labels = load_exported(exported[head]).labels
    assert [o["file"] for o in out] == files
    for o in out:
        assert o["prediction"] in labels
        assert sum(o["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert len(o["windows"]) == 1 and o["windows"][0]["start"] == 0
    table = invoke("predict", exported[head], *files, "--model", tiny_checkpoint)
    assert table.exit_code == 0 and all(lab in table.stdout.splitlines()[0] for lab in labels)


def recorded_elsewhere(exported_file, path, out):
    """A copy of an exported file whose Whisper checkpoint was recorded at `path`, or (None)
    without a recorded path, as files exported before it was kept."""
    saved = torch.load(exported_file, weights_only=True)
    saved["encoder"].pop("path")
    if path is not None:
        saved["encoder"]["path"] = str(path)
    torch.save(saved, out)
    return out


def test_predict_without_model_uses_the_recorded_checkpoint(exported, corpus):
    _, records = corpus
    result = invoke("predict", exported["qkv"], records[0].path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["prediction"] in load_exported(exported["qkv"]).labels
    assert "warning" not in result.stderr  # the very checkpoint the head was trained on


@pytest.mark.parametrize("at_path", ["other bytes", "missing", "not recorded"])
def test_a_recorded_checkpoint_that_changed_falls_back_to_the_name(exported, tmp_path, monkeypatch, at_path):
    import whisper

    import ser_cache.predict as predict_module

    moved = tmp_path / "tiny-random.pt"
    if at_path == "other bytes":
        make_checkpoint(moved, seed=1)
    model = recorded_elsewhere(exported["qkv"], None if at_path == "not recorded" else moved, tmp_path / "m.pt")
    asked = []
    monkeypatch.setattr(predict_module, "load_encoder", lambda name, **kw: asked.append(name) or load_encoder(name, **kw))
    monkeypatch.setattr(whisper, "_download", lambda *a, **kw: pytest.fail("a checkpoint was downloaded"))
    result = invoke("predict", model, "x.wav")
    assert asked == ["tiny-random"]  # the recorded name, never the file with other bytes
    assert result.exit_code != 0 and "not a model name Whisper can download" in result.output
    assert "--model PATH" in result.output
    assert (f"recorded at {moved} is missing or has other bytes" in result.output) == (at_path != "not recorded")


def test_early_stop_gives_the_full_encoders_probabilities(exported, corpus, tiny_checkpoint):
    _, records = corpus
    full = load_predictor(exported["qkv"], str(tiny_checkpoint), early_stop=False)
    early = load_predictor(exported["qkv"], str(tiny_checkpoint))
    # Later blocks are never computed: a hook inside the next block sees no call.
    calls = {"early": 0, "full": 0}
    for name, p in (("early", early), ("full", full)):
        p.enc.encoder.blocks[LAYER].mlp.register_forward_pre_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    for r in records[:4]:
        a, b = early.predict_file(r.path), full.predict_file(r.path)
        np.testing.assert_array_equal(a.probs, b.probs)
    assert calls == {"early": 0, "full": 4}


@pytest.mark.parametrize("mode", ["trim", "short", "padded"])
def test_prediction_states_equal_the_cache(corpus, tiny_checkpoint, mode):
    """What the head sees at prediction is what it was trained on, bit for bit."""
    root, records = corpus
    cache = open_cache(make_cache(root, records, tiny_checkpoint, mode))
    layer = cache.read_layer(LAYER)
    run = make_run(root, cache.root, "mean")
    export_run(run, root / f"mean-{mode}.pt", fold=0, overwrite=True)
    predictor = load_predictor(root / f"mean-{mode}.pt", str(tiny_checkpoint))
    by_id = {r.id: r for r in records}
    for i in (0, 7):
        from ser_cache.audio import load_utterance

        windows, _ = load_utterance(by_id[layer.ids[i]].path)
        np.testing.assert_array_equal(predictor.states(windows)[0], layer.utterance(i))


def test_other_checkpoint_is_refused_unless_allowed(exported, corpus, tmp_path):
    _, records = corpus
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    result = invoke("predict", exported["qkv"], records[0].path, "--model", other)
    assert result.exit_code != 0 and "sha256" in result.output and "--allow-other-model" in result.output
    result = invoke("predict", exported["qkv"], records[0].path, "--model", other, "--allow-other-model")
    assert result.exit_code == 0, result.output
    assert "warning: the head was trained on" in result.stderr


def test_other_shape_is_refused_even_when_allowed(exported, tmp_path):
    from conftest import TINY_DIMS

    wide = make_checkpoint(tmp_path / "wide.pt", dims={**TINY_DIMS, "n_audio_state": 64})
    with pytest.raises(PredictError, match="n_audio_state"):
        load_predictor(exported["qkv"], str(wide), allow_other_model=True)


def test_long_file_gives_windows_and_their_weighted_mean(exported, tiny_checkpoint, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(65.0, freq=200), 16000)
    predictor = load_predictor(exported["qkv"], str(tiny_checkpoint))
    r = predictor.predict_file(path)
    assert [(w.start, w.end) for w in r.windows] == [(0, 30), (30, 60), (60, 65)]
    weights = np.array([30, 30, 5]) / 65
    np.testing.assert_allclose(r.probs, sum(w * p.probs for w, p in zip(weights, r.windows)))
    table = invoke("predict", exported["qkv"], path, "--model", tiny_checkpoint).stdout
    assert "30.0-60.0 s" in table and "all 65.0 s" in table


def test_bad_file_fails_alone(exported, corpus, tiny_checkpoint, tmp_path):
    _, records = corpus
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    result = invoke("predict", exported["qkv"], bad, records[0].path, tmp_path / "missing.wav",
                    "--model", tiny_checkpoint, "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert "not a readable audio file" in out[0]["error"] and "not found" in out[2]["error"]
    assert out[1]["prediction"] in load_exported(exported["qkv"]).labels
    assert "2 of 3 files could not be used" in result.output


def test_an_ensemble_run_exports_and_predicts_as_one_file(corpus, tiny_checkpoint, tmp_path):
    """Export on all speakers trains N members (one file); export --fold K keeps fold K's
    members; predict gives the mean of the members' probabilities."""
    from ser_cache.heads import Ensemble

    root, records = corpus
    cache = make_cache(root, records, tiny_checkpoint, "trim")
    run = tmp_path / "run"
    train_from_cache(cache, LAYER, "mean", run, TrainConfig(**SMALL, ensemble=2), protocol="kfold", n_folds=3)
    export_run(run, tmp_path / "all.pt")
    export_run(run, tmp_path / "f0.pt", fold=0)
    ex = load_exported(tmp_path / "all.pt")
    assert isinstance(ex.model, Ensemble) and len(ex.model.members) == 2
    p = ex.provenance
    assert p["members"] == 2 and len(set(p["member_seeds"])) == 2 and p["member_seeds"][0] == 0
    member_epochs = [m["epoch"] for d in json.loads((run / "metrics.json").read_text())["fold_details"] for m in d["members"]]
    assert len(member_epochs) == 6 and p["choice"]["epoch"] == sorted(member_epochs)[2]  # median of all members
    saved, info = load_head(run / "fold_0.pt")
    fold0 = load_exported(tmp_path / "f0.pt")
    assert info["members"] == 2 and isinstance(fold0.model, Ensemble)
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(fold0.model.state_dict()[k], v, rtol=0, atol=0)
    result = invoke("predict", tmp_path / "all.pt", records[0].path, records[5].path, "--model", tiny_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    assert "ensemble of 2 mean heads" in result.stderr
    predictor = load_predictor(tmp_path / "all.pt", str(tiny_checkpoint))
    states = [predictor.states([load_utterance(records[i].path)[0][0]])[0] for i in (0, 5)]
    members = []
    for member in ex.model.members:
        predictor.exported.model = member
        members.append(predictor.head_probs(states))
    out = json.loads(result.stdout)
    np.testing.assert_allclose([list(o["probabilities"].values()) for o in out], np.mean(members, axis=0), atol=1e-5)


def test_a_run_fold_file_is_not_an_export(runs):
    with pytest.raises(PredictError, match="export it first"):
        load_exported(runs["qkv"] / "fold_0.pt")


# --- a head on several layers -----------------------------------------------------------------

STATES = (0, 1)  # of the tiny model's 0..2: the encoder can stop after block 1


@pytest.fixture(scope="module")
def multi_run(corpus, tiny_checkpoint):
    root, records = corpus
    cache = make_cache(root, records, tiny_checkpoint, "trim")
    out = root / "run-multi-mean"
    if not out.exists():
        train_from_cache(cache, "0-1", "mean", out, TrainConfig(**SMALL), protocol="kfold", n_folds=3)
    return out


def test_an_exported_multi_layer_head_predicts_as_its_fold_head(multi_run, corpus, tiny_checkpoint, tmp_path):
    root, records = corpus
    export_run(multi_run, tmp_path / "m.pt", fold=0)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["format"] == 3  # refused by name where unread
    ex = load_exported(tmp_path / "m.pt")
    assert ex.layer == STATES and ex.kwargs["n_states"] == 2
    fold_head, _ = load_head(multi_run / "fold_0.pt")
    assert ex.model.layer_weights() == pytest.approx(fold_head.layer_weights())
    predictor = load_predictor(tmp_path / "m.pt", str(tiny_checkpoint))
    ran = []  # the encoder stops after the highest state needed: block 2 never runs
    predictor.enc.encoder.blocks[1].register_forward_pre_hook(lambda *a: ran.append(1))
    data = open_cache(root / "cache-trim").read_layer(STATES)
    by_id = {r.id: r for r in records}
    from ser_cache.audio import load_utterance

    rows = [0, 5, 9]
    states = [predictor.states(load_utterance(by_id[data.ids[i]].path)[0])[0] for i in rows]
    for i, s in zip(rows, states):
        np.testing.assert_array_equal(s, data.utterance(i))  # stacked as the cache reader stacks them
    assert not ran
    x, mask = data.batch(rows)
    with torch.no_grad():
        expected = fold_head(x, mask).softmax(-1).numpy()
    np.testing.assert_allclose(predictor.head_probs(states), expected, atol=1e-6)


def test_a_multi_layer_run_exports_on_all_speakers_and_predicts(multi_run, corpus, tiny_checkpoint, tmp_path):
    _, records = corpus
    result = invoke("export", multi_run, "--out", tmp_path / "all.pt")
    assert result.exit_code == 0, result.output
    assert "mean head on layer 0+1, trained on all speakers" in result.output
    result = invoke("predict", tmp_path / "all.pt", records[0].path, "--model", tiny_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    assert "head on layer 0+1 of Whisper" in result.stderr and "1 run" in result.stderr
    assert sum(json.loads(result.stdout)[0]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
