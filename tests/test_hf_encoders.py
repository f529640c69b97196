"""transformers encoders: tiny randomly initialised WavLM, HuBERT, wav2vec2 (both front-end
norms) and data2vec-audio models, and a Whisper converted from the tiny openai-whisper
checkpoint, saved to folders and run through extract -> train and sweep -> export -> predict.

The numbers mean nothing; the invariants do: the states are transformers' hidden_states, a
batch gives the states its utterances give alone, prediction sees the cache's states bit for
bit, and every model that cannot be used is one line naming the fix. No network (conftest).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from ser_cache.audio import load_utterance
from ser_cache.cache import open_cache
from ser_cache.cli import main
from ser_cache.encoder import encoder_input, load_encoder, run_encoder
from ser_cache.errors import OptionError
from ser_cache.extract import ExtractOptions, encode_batch, extract
from ser_cache.hf_encoders import EncoderError, folder_sha256, run_hidden_states
from ser_cache.exporting import export_run
from ser_cache.predict import PredictError, load_exported, load_predictor
from ser_cache.sweeping import SweepSpec, run_sweep
from ser_cache.training import TrainConfig, train_from_cache
from ser_cache.whisper_to_hf import convert_whisper

from conftest import tone, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread_per_job")  # conftest

# Real architectures, toy sizes: the released convolutions (320-sample hop), width 32, 3 blocks.
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
MODELS = {  # name -> (config, do_normalize): both front-end norms, both places of the LayerNorm
    "wav2vec2-group": (transformers.Wav2Vec2Config(**TINY, feat_extract_norm="group"), False),
    "wav2vec2-layer": (transformers.Wav2Vec2Config(**TINY, feat_extract_norm="layer", do_stable_layer_norm=True), True),
    "hubert": (transformers.HubertConfig(**TINY, feat_extract_norm="group"), False),
    "wavlm": (transformers.WavLMConfig(**TINY, feat_extract_norm="layer", do_stable_layer_norm=True, num_buckets=16,
                                       max_bucket_distance=40), True),
    "data2vec-audio": (transformers.Data2VecAudioConfig(**{**TINY, "num_conv_pos_embeddings": 3}, conv_pos_kernel_size=5),
                       True),
}
LAYER = 2  # of states 0..3: the last block is never run when predicting from it
SMALL = dict(epochs=2, d_model=16, n_heads=2, head_dim=4, device="cpu", compute_dtype="float32")


def save_model(folder: Path, name: str, seed: int = 0) -> Path:
    """A randomly initialised model of MODELS[name] in save_pretrained's layout, with its
    feature extractor's preprocessor_config.json."""
    config, normalize = MODELS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config)
    model.save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=normalize).save_pretrained(folder)
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def folders(root, tiny_checkpoint):
    out = {name: save_model(root / "models" / name, name) for name in MODELS}
    out["whisper"] = convert_whisper(tiny_checkpoint, root / "models" / "whisper")
    return out


@pytest.fixture(scope="module")
def corpus(root):
    folder = root / "corpus"
    records = write_corpus(folder, n_speakers=6, per_speaker=3)
    lines = ["path,label,speaker"] + [f"{Path(r.path).name},{r.label},{r.speaker}" for r in records]
    (folder / "utterances.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder, records


def windows_of(records, n=4):
    return [load_utterance(r.path)[0][0] for r in records[:n]]


# --- loading and states --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_states_are_transformers_hidden_states(folders, name):
    enc = load_encoder(str(folders[name]))
    assert enc.family == MODELS[name][0].model_type and enc.waveform and enc.n_states == 4 and enc.dim == 32
    assert enc.dims["hop_samples"] == 320 and enc.dims["receptive_samples"] == 400
    assert enc.dims["do_normalize"] is MODELS[name][1]
    assert enc.sha256 == folder_sha256(folders[name]) and enc.path == str(folders[name].absolute())
    x = torch.from_numpy(tone(0.7)[:, 0])[None]
    with torch.inference_mode():
        ref = enc.encoder(x, output_hidden_states=True)
    ours = run_hidden_states(enc.encoder, x, None, [0, 1, 2, 3])
    for s in range(3):  # state i: block i's output (0: the first block's input)
        torch.testing.assert_close(ours[s], ref.hidden_states[s], rtol=0, atol=0)
    torch.testing.assert_close(ours[3], ref.last_hidden_state, rtol=0, atol=0)  # the encoder's output
    # stopping after block 1: block 2 is never called, and state 1 is the same
    calls = []
    hook = enc.encoder.encoder.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(run_hidden_states(enc.encoder, x, None, [1])[1], ours[1], rtol=0, atol=0)
    hook.remove()
    assert calls == []


@pytest.mark.parametrize("name", sorted(MODELS) + ["whisper"])
def test_a_batch_gives_the_states_of_its_utterances_alone(folders, corpus, name):
    enc = load_encoder(str(folders[name]))
    windows = windows_of(corpus[1], 5)
    assert len({len(w) for w in windows}) == 5  # lengths differ: padding or grouping is exercised
    batch = [(0, i, *encoder_input(enc, w, "short")) for i, w in enumerate(windows)]
    keep = [0, 1, enc.n_states - 1]
    together = encode_batch(enc, batch, "short", keep, "float32", "cpu")
    for i, item in enumerate(batch):
        alone = encode_batch(enc, [item], "short", keep, "float32", "cpu")[0]
        for s in keep:
            assert together[i][s].shape == (item[3], 32)
            np.testing.assert_allclose(together[i][s], alone[s], rtol=0, atol=2e-5)


def test_normalisation_follows_the_preprocessor(folders, corpus):
    quiet = windows_of(corpus[1], 1)[0]
    for name, same in (("wavlm", True), ("hubert", False)):  # do_normalize true / false
        enc = load_encoder(str(folders[name]))
        a, _ = encoder_input(enc, quiet, "short")
        b, _ = encoder_input(enc, 3 * quiet, "short")
        assert torch.allclose(a, b, atol=1e-5) == same


def test_whisper_through_transformers_gives_the_openai_whisper_states(folders, tiny_checkpoint, corpus):
    ours, theirs = load_encoder(str(folders["whisper"])), load_encoder(str(tiny_checkpoint))
    assert ours.family == "whisper" and theirs.family == "openai-whisper" and not ours.waveform
    assert {k: theirs.dims[k] for k in ours.dims} == ours.dims
    windows = windows_of(corpus[1], 3)
    for mode in ("padded", "trim", "short"):
        batch = [(0, i, *encoder_input(ours, w, mode)) for i, w in enumerate(windows)]
        a = encode_batch(ours, batch, mode, [0, 1, 2], "float32", "cpu")
        b = encode_batch(theirs, batch, mode, [0, 1, 2], "float32", "cpu")
        for x, y in zip(a, b):
            for s in (0, 1, 2):
                np.testing.assert_allclose(x[s], y[s], rtol=1e-5, atol=1e-5)


def test_whisper_padded_states_are_whisper_encoders_hidden_states(folders, corpus):
    enc = load_encoder(str(folders["whisper"]))
    mel = torch.stack([encoder_input(enc, w, "padded")[0] for w in windows_of(corpus[1], 2)])
    with torch.inference_mode():
        ref = enc.encoder(mel, output_hidden_states=True)
    states = run_encoder(enc, list(mel), [0, 0], "padded", [0, 1, 2])
    for s in (0, 1):
        torch.testing.assert_close(states[s], ref.hidden_states[s], rtol=0, atol=0)
    torch.testing.assert_close(states[2], ref.last_hidden_state, rtol=0, atol=0)


class NotATensor:
    """Stands for any pickled object: loading it could run code, so it is refused."""


def pickled_model(folder: Path, source: Path, extra=None) -> Path:
    """`source`'s model with its weights as an older repository holds them: pytorch_model.bin."""
    import shutil

    from safetensors.torch import load_file

    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(source / name, folder / name)
    weights = load_file(source / "model.safetensors")
    torch.save({**weights, **({"extra": extra} if extra is not None else {})}, folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_load_with_weights_only(root, folders, corpus):
    folder = pickled_model(root / "bin-model", folders["hubert"])
    a, b = load_encoder(str(folder)), load_encoder(str(folders["hubert"]))
    x = [encoder_input(a, w, "short")[0] for w in windows_of(corpus[1], 1)]
    torch.testing.assert_close(run_encoder(a, x, [0], "short", [3])[3], run_encoder(b, x, [0], "short", [3])[3])
    evil = pickled_model(root / "evil-model", folders["hubert"], extra=NotATensor())
    with pytest.raises(EncoderError, match="cannot be loaded as a hubert model"):
        load_encoder(str(evil))


# --- extract -> train, sweep -> export -> predict ------------------------------------------------


def make_cache(root, records, folder, name):
    out = root / f"cache-{name}"
    if not out.exists():
        extract(records, out, "csv", load_encoder(str(folder)), ExtractOptions(mode="short", progress=False, batch_size=4))
    return out


@pytest.fixture(scope="module")
def caches(root, folders, corpus):
    return {name: make_cache(root, corpus[1], folders[name], name) for name in folders}


def exported_head(root, caches, name) -> Path:
    """A mean head on LAYER of the cache of model `name`, trained on 3 folds, fold 0 exported."""
    out = root / f"{name}.pt"
    if not out.exists():
        run = root / f"run-{name}"
        train_from_cache(caches[name], LAYER, "mean", run, TrainConfig(**SMALL), protocol="kfold", n_folds=3)
        export_run(run, out, fold=0)
    return out


@pytest.mark.parametrize("name", sorted(MODELS) + ["whisper"])
def test_extract_train_export_predict(root, folders, caches, corpus, name):
    cache = open_cache(caches[name])
    s = cache.settings
    assert s.family == MODELS.get(name, (transformers.WhisperConfig(),))[0].model_type and s.mode == "short"
    assert cache.complete and cache.summary()["utterances"] == len(corpus[1])
    assert cache.provenance["model_path"] == str(folders[name].absolute())
    layer = cache.read_layer(LAYER)
    # 50 frames a second: one per 320 samples of speech
    assert all(abs(n - d * 50) <= 2 for n, d in zip(layer.n_frames, [r.duration for r in cache.records()]))
    exported = exported_head(root, caches, name)
    assert json.loads((root / f"run-{name}" / "config.json").read_text())["cache"]["family"] == s.family
    ex = load_exported(exported)
    assert ex.encoder == {"family": s.family, "name": s.model, "sha256": s.model_sha256, "dims": s.dims,
                          "path": str(folders[name].absolute())}
    predictor = load_predictor(exported)  # the recorded folder, its hash checked
    assert predictor.enc.sha256 == s.model_sha256
    by_id = {r.id: r for r in corpus[1]}
    for i in (0, 5):  # what the head sees is what it was trained on: extraction ran batches
        # of 4 and prediction one window, which BLAS may sum in another order, so a value may
        # round to the neighbouring float16 (measured: at most 1 in 300 values, 1.6e-3 apart)
        windows, _ = load_utterance(by_id[layer.ids[i]].path)
        got, want = predictor.states(windows)[0].astype(np.float32), layer.utterance(i).astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2 ** -10, atol=2 ** -14)
    probs = predictor.predict_file(corpus[1][0].path).probs
    assert probs.sum() == pytest.approx(1, abs=1e-5)


def test_one_sweep_over_caches_of_different_encoders(root, caches):
    spec = SweepSpec(caches=[caches["wavlm"], caches["hubert"], caches["whisper"]], heads=["linear"],
                     train=TrainConfig(**SMALL), n_folds=3)
    out = root / "sweep"
    run_sweep(spec, out, jobs=1, progress=False)
    summary = (out / "summary.md").read_text()
    for name in ("wavlm", "hubert", "whisper"):
        assert f"cache-{name}" in summary


def test_extract_cli_takes_a_model_folder_and_defaults_to_short(root, folders, corpus):
    out = root / "cli-cache"
    result = invoke("extract", corpus[0], "--corpus", "csv", "--model", folders["wav2vec2-group"], "--out", out,
                    "--device", "cpu", "--layers", "0,3")
    assert result.exit_code == 0, result.output
    assert "(wav2vec2, sha256" in result.output
    info = json.loads(invoke("inspect", out, "--json").output)
    assert info["family"] == "wav2vec2" and info["mode"] == "short" and info["layers"] == [0, 3]
    assert info["dims"]["hop_samples"] == 320 and info["dims"]["do_normalize"] is False


def test_a_waveform_encoder_refuses_the_whisper_window_modes(root, folders, corpus):
    with pytest.raises(OptionError, match="pass --mode short, not trim"):
        extract(corpus[1], root / "no", "csv", load_encoder(str(folders["wavlm"])), ExtractOptions(mode="trim", progress=False))


def test_a_clip_under_the_receptive_field_is_skipped_with_its_reason(root, folders, tmp_path):
    import soundfile as sf

    from ser_cache.records import Utterance

    records = []
    for i, seconds in enumerate((0.02, 0.5)):  # 320 samples: under the 400 the convolutions need
        path = tmp_path / f"u{i}.wav"
        sf.write(path, tone(seconds), 16000)
        records.append(Utterance(id=f"u{i}", path=str(path), label="a", speaker="s", duration=seconds, original_label="a"))
    out = tmp_path / "c"
    summary = extract(records, out, "csv", load_encoder(str(folders["wavlm"])), ExtractOptions(mode="short", progress=False))
    assert summary.utterances == 1 and summary.skipped[0]["id"] == "u0"
    assert "receptive field (400 samples)" in summary.skipped[0]["reason"]


# --- predict trusts only the same encoder ---------------------------------------------------


def test_predict_falls_back_to_the_name_when_the_recorded_folder_changed(root, folders, caches, tmp_path):
    import shutil

    moved = tmp_path / "hubert"
    shutil.copytree(folders["hubert"], moved)
    cache = tmp_path / "cache"
    shutil.copytree(caches["hubert"], cache)
    meta = json.loads((cache / "cache.json").read_text())
    meta["provenance"]["model_path"] = str(moved)
    (cache / "cache.json").write_text(json.dumps(meta))
    run = tmp_path / "run"
    train_from_cache(cache, LAYER, "linear", run, TrainConfig(**SMALL), protocol="kfold", n_folds=3)
    export_run(run, tmp_path / "h.pt", fold=0)
    assert load_predictor(tmp_path / "h.pt").enc.path == str(moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-4}))  # other bytes
    with pytest.raises(PredictError, match=r"HuBERT 'hubert' .* not a hub id \(and the model recorded at .* is "
                                           r"missing or has other bytes\): pass --model PATH to that model"):
        load_predictor(tmp_path / "h.pt")  # the recorded name "hubert" is no hub id
    with pytest.raises(PredictError, match="has sha256 .*--allow-other-model"):
        load_predictor(tmp_path / "h.pt", str(moved))
    assert load_predictor(tmp_path / "h.pt", str(moved), allow_other_model=True).enc.path == str(moved)


def test_predict_refuses_an_encoder_of_another_family(root, folders, caches):
    with pytest.raises(PredictError, match="is a hubert encoder, the head read states of a wavlm encoder"):
        load_predictor(exported_head(root, caches, "wavlm"), str(folders["hubert"]), allow_other_model=True)


def test_a_head_on_openai_whisper_reads_the_converted_models_states(root, folders, tiny_checkpoint, corpus):
    """Same weights, two code paths: the head trained on the openai-whisper cache gives the
    same probabilities with transformers' Whisper (allowed in: another SHA-256)."""
    cache = root / "cache-openai"
    extract(corpus[1], cache, "csv", load_encoder(str(tiny_checkpoint)), ExtractOptions(mode="short", progress=False))
    run = root / "run-openai"
    train_from_cache(cache, LAYER, "mean", run, TrainConfig(**SMALL), protocol="kfold", n_folds=3)
    export_run(run, root / "openai.pt", fold=0)
    with pytest.raises(PredictError, match="--allow-other-model"):
        load_predictor(root / "openai.pt", str(folders["whisper"]))
    a = load_predictor(root / "openai.pt")
    b = load_predictor(root / "openai.pt", str(folders["whisper"]), allow_other_model=True)
    for r in corpus[1][:3]:
        np.testing.assert_allclose(a.predict_file(r.path).probs, b.predict_file(r.path).probs, rtol=0, atol=1e-5)


def test_a_hub_id_is_read_from_transformers_cache_offline(folders, tmp_path, monkeypatch):
    """A model fetched earlier: its snapshot in the cache, read with no network; files of the
    repository that transformers does not read (a second copy of the weights in float32, as
    openai/whisper-large-v3 has) are not part of the fingerprint."""
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--ser-cache-tests--tiny-wavlm" / "snapshots" / ("0" * 40)
    shutil.copytree(folders["wavlm"], snapshot)
    (snapshot / "model.fp32-00001-of-00001.safetensors").write_bytes(b"not read")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = load_encoder("ser-cache-tests/tiny-wavlm")
    assert enc.name == "ser-cache-tests/tiny-wavlm" and enc.family == "wavlm" and enc.path == str(snapshot)
    assert enc.sha256 == folder_sha256(folders["wavlm"])


# --- one line for every model that cannot be used ----------------------------------------------


def _broken(folders, tmp_path, case) -> str:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders["wavlm"], folder)
    weights = folder / "model.safetensors"
    if case == "no config":
        (folder / "config.json").unlink()
    elif case == "config not json":
        (folder / "config.json").write_text("{not json")
    elif case == "no weights":
        weights.unlink()
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "weights of another shape":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    elif case == "weights of another model":
        shutil.copy(folders["hubert"] / "model.safetensors", weights)
    elif case == "unsupported family":
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    elif case == "missing folder":
        shutil.rmtree(folder)
    elif case == "hub id not cached":
        return "ser-cache-tests/no-such-model"
    elif case == "short name not cached":
        return "wavlm-large"
    return str(folder)


BROKEN = {
    "no config": r"has no config\.json: pass a folder holding config\.json and model\.safetensors",
    "config not json": r"config\.json cannot be read \(.*\): save the model again with save_pretrained",
    "no weights": r"has no weights \(model\.safetensors or pytorch_model\.bin\)",
    "truncated weights": r"cannot be loaded as a wavlm model \(.*\): pass a folder",
    "weights of another shape": r"cannot be loaded as a wavlm model \(.*\): pass a folder",
    "weights of another model": r"its weights do not fit its config\.json \(\d+ missing, e\.g\. ",
    "unsupported family": r"holds a 'bert' model; supported families: data2vec-audio, hubert, wav2vec2, wavlm, whisper",
    "missing folder": r"is neither a checkpoint file, a model folder, a hub id nor a model name",
    "hub id not cached": r"ser-cache-tests/no-such-model is neither a local folder nor a model in the Hugging Face "
                         r"cache .*: on a machine with network run `hf download ser-cache-tests/no-such-model`",
    "short name not cached": r"microsoft/wavlm-large is neither a local folder nor a model in the Hugging Face cache",
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_model_that_cannot_be_used_is_one_line(folders, corpus, tmp_path, case):
    model = _broken(folders, tmp_path, case)
    result = invoke("extract", corpus[0], "--corpus", "csv", "--model", model, "--out", tmp_path / "c", "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == result.output.rstrip("\n").splitlines()[-1], result.output
    assert re.search(BROKEN[case], errors[0]), errors[0]
    with pytest.raises((EncoderError, OptionError)):
        load_encoder(model)


def test_convert_whisper_cli_writes_a_folder_extract_reads(tiny_checkpoint, tmp_path):
    out = tmp_path / "whisper-hf"
    result = invoke("convert-whisper", tiny_checkpoint, "--out", out)
    assert result.exit_code == 0, result.output
    enc = load_encoder(str(out))
    assert enc.family == "whisper" and enc.n_states == 3 and enc.sha256 == folder_sha256(out)
    again = invoke("convert-whisper", tiny_checkpoint, "--out", out)
    assert again.exit_code != 0 and "exists and is not empty: pass a new folder" in again.output
