"""The cache: settings must match to reuse it, shards resume, parts add up, inspect reports."""
from __future__ import annotations

import errno
import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from ser_cache.cache import SHARD_DIR, CacheError, ShardClaims, open_cache, shard_name
from ser_cache.locks import LockError, folder_lock
from ser_cache.cli import main
from ser_cache.encoder import load_encoder
from ser_cache.extract import ExtractOptions, extract, parse_layers, parse_shard

from conftest import make_checkpoint, write_corpus

SMALL_SHARDS = 20_000  # bytes: a few utterances per shard, so plans have several shards


@pytest.fixture(scope="module")
def enc(tiny_checkpoint):
    return load_encoder(str(tiny_checkpoint))


@pytest.fixture()
def records(tmp_path):
    return write_corpus(tmp_path / "corpus", n_speakers=3, per_speaker=4)


def run(records, out, enc, **kw):
    opts = ExtractOptions(progress=False, shard_bytes=SMALL_SHARDS, **kw)
    return extract(records, out, "csv", enc, opts)


def all_layers(path):
    cache = open_cache(path)
    return {s: cache.read_layer(s) for s in cache.layers}


def assert_same_cache(a, b):
    la, lb = all_layers(a), all_layers(b)
    assert la.keys() == lb.keys()
    for s in la:
        assert list(la[s].ids) == list(lb[s].ids)
        np.testing.assert_array_equal(la[s].offsets, lb[s].offsets)
        np.testing.assert_array_equal(la[s].frames, lb[s].frames)


def test_plan_has_several_shards_and_read_layer_is_in_id_order(records, enc, tmp_path):
    run(records, tmp_path / "c", enc)
    cache = open_cache(tmp_path / "c")
    assert len(cache.plan) > 1 and cache.complete
    layer = cache.read_layer(1)
    assert list(layer.ids) == sorted(r.id for r in records)
    assert layer.frames.dtype == np.float16 and layer.dim == enc.dim
    by_id = {r.id: r for r in records}
    assert [by_id[i].label for i in layer.ids] == list(layer.labels)


@pytest.mark.parametrize("change, word", [
    (dict(mode="short"), "mode"),
    (dict(dtype="float32"), "dtype"),
    (dict(layers=[0, 1]), "layers"),
    (dict(long_audio="truncate"), "long_audio"),
])
def test_other_settings_are_refused(records, enc, tmp_path, change, word):
    run(records, tmp_path / "c", enc)
    with pytest.raises(CacheError, match=word):
        run(records, tmp_path / "c", enc, **change)


def test_other_model_or_records_are_refused(records, enc, tmp_path):
    run(records, tmp_path / "c", enc)
    other = load_encoder(str(make_checkpoint(tmp_path / "other.pt", seed=1)))
    with pytest.raises(CacheError, match="model_sha256"):
        run(records, tmp_path / "c", other)
    with pytest.raises(CacheError, match="records_hash"):
        run(records[:-1], tmp_path / "c", enc)
    with pytest.raises(CacheError, match="records_hash"):
        run([replace(records[0], label="sad" if records[0].label != "sad" else "happy")] + records[1:], tmp_path / "c", enc)


def test_rerun_resumes_missing_shards_only(records, enc, tmp_path):
    run(records, tmp_path / "whole", enc)
    run(records, tmp_path / "c", enc)
    cache = open_cache(tmp_path / "c")
    for k in (0, len(cache.plan) - 1):
        cache.shard_path(k).unlink()  # as if killed before these shards were renamed
    (cache.shard_dir / f"{shard_name(1)}.h5.tmp").write_bytes(b"half a shard")
    assert not cache.complete
    with pytest.raises(CacheError, match="incomplete"):
        cache.read_layer(0)
    summary = run(records, tmp_path / "c", enc)
    assert summary.shards_written == 2 and summary.shards_done_before == len(cache.plan) - 2
    assert not (cache.shard_dir / f"{shard_name(1)}.h5.tmp").exists()
    assert_same_cache(tmp_path / "c", tmp_path / "whole")
    assert run(records, tmp_path / "c", enc).shards_written == 0


def test_shard_jobs_fill_one_cache(records, enc, tmp_path):
    run(records, tmp_path / "whole", enc)
    for i in range(3):
        s = run(records, tmp_path / "parts", enc, shard=(i, 3))
        assert s.shards_this_job == len(range(i, s.shards_planned, 3))
        assert open_cache(tmp_path / "parts").complete == (i == 2)
    assert_same_cache(tmp_path / "parts", tmp_path / "whole")


def test_inspect_json_contract(records, enc, tmp_path):
    run(records, tmp_path / "c", enc, layers=[0, 2])
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "c"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    for key in ("utterances", "layers", "dim", "model", "model_sha256", "mode", "dtype", "shards", "skipped", "complete"):
        assert key in info
    assert info["utterances"] == len(records) and info["layers"] == [0, 2] and info["dim"] == enc.dim
    assert info["model_sha256"] == enc.sha256 and info["complete"] is True and info["skipped"] == []


def test_layer_and_shard_specs():
    assert parse_layers("all", 5) == [0, 1, 2, 3, 4]
    assert parse_layers("0,2-3", 5) == [0, 2, 3]
    with pytest.raises(ValueError, match="0..4"):
        parse_layers("5", 5)
    with pytest.raises(ValueError, match="I/N"):
        parse_shard("3")
    with pytest.raises(ValueError, match="0 <= I < N"):
        parse_shard("3/3")


def test_a_shard_claim_is_exclusive_and_leaves_no_file(tmp_path):
    mine, theirs = ShardClaims(tmp_path), ShardClaims(tmp_path)  # two open files: as two processes
    assert mine.take(3) and not theirs.take(3)
    assert theirs.held_elsewhere(3) and not mine.held_elsewhere(3) and not theirs.held_elsewhere(4)
    assert theirs.take(4)  # other shards stay free
    mine.release(3)
    assert not (tmp_path / f"{shard_name(3)}.lock").exists() and not theirs.held_elsewhere(3)
    assert theirs.take(3)
    theirs.release_all()
    with folder_lock(tmp_path / "new"):  # creates the folder it locks
        assert (tmp_path / "new").is_dir()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new"]


def test_a_file_system_without_locks_is_named_with_the_fix(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockError, match="does not support the locks.*local disk"):
        ShardClaims(tmp_path).take(0)
    assert list(tmp_path.iterdir()) == [tmp_path / f"{shard_name(0)}.lock"]  # only the empty lock file, harmless


# --- several layers in one LayerData ------------------------------------------------------------


def synthetic_cache(root, n_utts=48, per_shard=16, dim=64, states=(0, 1, 2), frames=(300, 600), seed=0,
                    n_speakers=4, targets=False):
    """A cache of random states written through the cache's own writer (write_shard), larger
    than the tiny Whisper's so that memory is dominated by the frames, in well under a second.
    Utterance i: speaker i % n_speakers, label a or b; with 4 speakers, label i % 2 (each
    speaker one label), else every speaker has both (so that any speaker split trains).
    targets: every record also carries a random numeric target, "arousal"."""
    from dataclasses import asdict

    from ser_cache import cache as C
    from ser_cache.records import Utterance, save_records

    rng = np.random.default_rng(seed)
    label = (lambda i: i % 2) if n_speakers == 4 else (lambda i: i // n_speakers % 2)
    records = [Utterance(id=f"u{i:05d}", path=f"/nowhere/u{i:05d}.wav", label=("a", "b")[label(i)],
                         speaker=f"s{i % n_speakers}", duration=1.0,
                         targets={"arousal": float(rng.uniform(1, 5))} if targets else ()) for i in range(n_utts)]
    plan = [[r.id for r in records[k : k + per_shard]] for k in range(0, n_utts, per_shard)]
    settings = C.CacheSettings(corpus="csv", model="synthetic", model_sha256="0" * 64,
                               dims={"n_audio_state": dim, "n_audio_layer": max(states)}, mode="trim",
                               dtype="float16", layers=list(states), long_audio="refuse", records_hash="-",
                               n_records=n_utts, shard_bytes=1)
    (root / C.SHARD_DIR).mkdir(parents=True)
    save_records(records, root / C.RECORDS_FILE)
    (root / C.PLAN_FILE).write_text(json.dumps(plan))
    (root / C.SETTINGS_FILE).write_text(json.dumps({"settings": asdict(settings), "provenance": {}}))
    for k, ids in enumerate(plan):
        wanted = set(ids)
        shard = [r for r in records if r.id in wanted]
        lengths = rng.integers(*frames, size=len(shard))
        layout = C.ShardLayout(records=shard, n_frames=lengths.tolist(), speech_frames=lengths.tolist())
        C.write_shard(root / C.SHARD_DIR, k, layout, [{s: rng.standard_normal((n, dim)).astype(np.float16) for s in states}
                                                      for n in lengths], list(states), dim, "float16")
    return open_cache(root)


def test_several_layers_are_stacked_in_each_row_in_state_order(tmp_path):
    cache = synthetic_cache(tmp_path / "c", n_utts=12, per_shard=5, dim=8, frames=(3, 9))
    one = {s: cache.read_layer(s) for s in (0, 2)}
    both = cache.read_layer((0, 2))
    assert both.layer == (0, 2) and both.layers == [0, 2] and both.n_states == 2
    assert both.dim == 8 and both.width == 16 and one[0].width == one[0].dim == 8 and one[0].layer == 0
    np.testing.assert_array_equal(both.frames, np.hstack([one[0].frames, one[2].frames]))
    np.testing.assert_array_equal(both.offsets, one[0].offsets)
    assert list(both.ids) == list(one[0].ids)
    converted = cache.read_layer((0, 2), dtype=np.float32)  # the converting path fills the same columns
    np.testing.assert_array_equal(converted.frames, both.frames.astype(np.float32))
    assert cache.read_layer([2]).layer == 2  # one state is the single-layer case
    with pytest.raises(CacheError, match=r"layers \[3, 4\] are not in this cache; it holds layers \[0, 1, 2\]"):
        cache.read_layer((1, 3, 4))


def test_reading_several_layers_peaks_near_their_stored_size(tmp_path):
    """Each state is read into its own columns of the final array: no per-layer arrays to
    stack, so the peak Python-visible allocation stays within 1.5x of the states' size."""
    import tracemalloc

    cache = synthetic_cache(tmp_path / "c")
    stored = sum(info["frames"] for info in map(cache.sidecar, range(len(cache.plan)))) * cache.dim * 2 * 2
    tracemalloc.start()
    try:
        data = cache.read_layer((0, 2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data.frames.nbytes == stored
    assert stored <= peak <= 1.5 * stored, (peak, stored)  # the frames are seen, and little else


# --- writing a shard in place, as the encoder goes ------------------------------------------------


def test_states_put_in_any_order_land_in_their_records_places(tmp_path):
    """The encoder hands states over by length, not plan order: each utterance's rows land at
    its own offsets, the metadata is the layout's, and the sidecar's checksum is the file's."""
    import h5py

    from ser_cache import cache as C
    from ser_cache.records import Utterance

    rng = np.random.default_rng(0)
    records = [Utterance(id=f"u{i}", path=f"/x/u{i}.wav", label="a", speaker="s", duration=1.0) for i in range(5)]
    n_frames = [3, 7, 1, 5, 2]
    states = [{s: rng.standard_normal((n, 4)).astype(np.float16) for s in (0, 2)} for n in n_frames]
    layout = C.ShardLayout(records=records, n_frames=n_frames, speech_frames=[n - 1 for n in n_frames],
                           skipped=[("bad", "/x/bad.wav", "empty file (0 bytes)")], notes=[("u1", "digital silence")])
    shard = C.ShardFile(tmp_path, 3, layout, [0, 2], 4, "float16")
    for i in (4, 1, 3, 0):
        shard.put(records[i].id, states[i])
    with pytest.raises(AssertionError, match="u2"):  # a record without states is never finished
        shard.finish()
    assert list(tmp_path.iterdir()) == []  # and leaves nothing behind

    shard = C.ShardFile(tmp_path, 3, layout, [0, 2], 4, "float16")
    for i in (4, 1, 3, 0, 2):
        shard.put(records[i].id, states[i])
    info = shard.finish()
    path = tmp_path / "shard-00003.h5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00003.h5", "shard-00003.json"]
    assert info["sha256"] == C.file_sha256(path) and info["frames"] == sum(n_frames)
    with h5py.File(path) as f:
        offsets = f["offsets"][()]
        for i, one in enumerate(states):
            for s in (0, 2):
                np.testing.assert_array_equal(f[C.layer_name(s)][offsets[i] : offsets[i + 1]], one[s])
        assert list(f["ids"].asstr()[()]) == [r.id for r in records]
        assert list(f["speech_frames"][()]) == [n - 1 for n in n_frames]
        assert list(f["skipped_ids"].asstr()[()]) == ["bad"] and list(f["note_texts"].asstr()[()]) == ["digital silence"]


def test_cached_states_are_each_utterance_encoded_alone(records, enc, tmp_path):
    """Through the whole pipeline (loaders, batches of several shards, the writer's raw writes),
    every utterance's rows in the cache are its own states."""
    from ser_cache.audio import load_utterance
    from ser_cache.encoder import encode, log_mel

    run(records, tmp_path / "c", enc, mode="trim", dtype="float32", batch_size=3)
    cache = open_cache(tmp_path / "c")
    assert len(cache.plan) > 2
    by_id = {r.id: r for r in records}
    for s in cache.layers:
        layer = cache.read_layer(s)
        for i, rid in enumerate(layer.ids):
            audio = load_utterance(by_id[rid].path)[0][0]
            alone = encode(enc.encoder, log_mel(audio, enc.dims["n_mels"], "trim")[None], None, [s])[s][0]
            np.testing.assert_allclose(layer.utterance(i), alone[: layer.n_frames[i]].numpy(), rtol=1e-4, atol=1e-5)


def test_a_shard_is_laid_out_and_written_while_its_utterances_are_encoded(records, enc, tmp_path, monkeypatch):
    """A shard's file exists before its last batch is encoded: the write overlaps the encoder
    rather than following it (the extraction overhead of short clips, issue #14)."""
    import time

    from ser_cache import extract as X

    out = tmp_path / "c"
    real = X.encode_batch
    batches_seen: dict[int, int] = {}
    laid_out_in_time = []

    def encode_batch(enc_, batch, *a, **kw):
        k = batch[0][0]
        batches_seen[k] = batches_seen.get(k, 0) + 1
        if batches_seen[k] > 1:  # an earlier batch of this shard was handed to the writer
            deadline = time.monotonic() + 5.0
            while not list((out / SHARD_DIR).glob(f"{shard_name(k)}.h5.*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.005)
            laid_out_in_time.append(bool(list((out / SHARD_DIR).glob(f"{shard_name(k)}.h5.*.tmp"))))
        return real(enc_, batch, *a, **kw)

    monkeypatch.setattr(X, "encode_batch", encode_batch)
    X.extract(records, out, "csv", enc, ExtractOptions(progress=False, shard_bytes=10**6, batch_size=2))
    assert max(batches_seen.values()) > 1 and laid_out_in_time and all(laid_out_in_time)
    assert open_cache(out).complete

