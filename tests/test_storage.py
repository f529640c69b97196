"""storage.py: invariants of the cache-size estimate (ratios, exact cases, refusals), no golden tables."""
from __future__ import annotations

import pytest

from ser_cache.errors import OptionError
from ser_cache.storage import (ITEMSIZES, MODES, N_WINDOW_FRAMES, STORES, WHISPER_SHAPES, cache_bytes,
                               describe_estimate, storage_table)

BASE = WHISPER_SHAPES["base"]  # (7, 512)


def test_base_frames_per_hour_is_exact_when_frames_divide_evenly():
    # 1000 utterances of 3.6 s: 180 frames each, nothing rounded.
    for mode in ("trim", "short"):
        assert cache_bytes(*BASE, mode=mode, seconds=3600, utterances=1000) == 50 * 3600 * 7 * 512 * 2
    # 180 frames pool into 180 / K rows exactly for K dividing 180.
    for k in (2, 4, 3, 9):
        assert cache_bytes(*BASE, frame_pool=k, seconds=3600, utterances=1000) == 50 * 3600 * 7 * 512 * 2 // k


@pytest.mark.parametrize("k", [2, 4, 8, 16])
@pytest.mark.parametrize("seconds,utterances", [(3600, None), (5310, 1440), (37.3, 11)])
def test_pooled_is_about_one_kth_of_frames(k, seconds, utterances):
    frames = cache_bytes(*BASE, seconds=seconds, utterances=utterances)
    pooled = cache_bytes(*BASE, frame_pool=k, seconds=seconds, utterances=utterances)
    n = utterances or round(seconds / 3.7)
    row = 7 * 512 * 2
    # At most one partial group per utterance, on top of the one frame per utterance the
    # frames estimate may itself have rounded up.
    assert frames / k - row <= pooled <= frames / k + n * row


def test_stats_is_exactly_two_float32_vectors_per_utterance_and_state():
    for states, dim in WHISPER_SHAPES.values():
        for n in (1, 7, 973):
            for mode in MODES:
                got = cache_bytes(states, dim, store="stats", mode=mode, seconds=n * 2.5, utterances=n)
                assert got == n * states * 2 * dim * 4
    # float32 whatever dtype is asked for the frames, and pooling does not change it.
    assert cache_bytes(*BASE, store="stats", dtype="float16", frame_pool=4) == \
        cache_bytes(*BASE, store="stats", dtype="float32")


def test_float32_is_twice_float16():
    for mode in MODES:
        for k in (1, 3, 8):
            half = cache_bytes(*BASE, mode=mode, frame_pool=k, dtype="float16", seconds=5310, utterances=1440)
            assert cache_bytes(*BASE, mode=mode, frame_pool=k, dtype="float32", seconds=5310, utterances=1440) == 2 * half


def test_stats_is_under_a_fortieth_of_frames_for_base_at_ravdess_durations():
    assert cache_bytes(*BASE, store="stats", mean_duration=3.7) * 40 < cache_bytes(*BASE, mean_duration=3.7)


def test_padded_keeps_1500_frames_per_utterance_whatever_its_length():
    assert N_WINDOW_FRAMES == 1500
    for seconds in (0.5, 3.7, 29.0):
        got = cache_bytes(*BASE, mode="padded", seconds=seconds * 10, utterances=10)
        assert got == 10 * 1500 * 7 * 512 * 2
    assert cache_bytes(*BASE, mode="padded", frame_pool=4, seconds=37, utterances=10) == 10 * 375 * 7 * 512 * 2


def test_default_utterances_follow_mean_duration():
    assert cache_bytes(*BASE, store="stats", seconds=3600) == round(3600 / 3.7) * 7 * 2 * 512 * 4
    assert cache_bytes(*BASE, store="stats", seconds=3600, mean_duration=1.8) == 2000 * 7 * 2 * 512 * 4
    assert cache_bytes(*BASE, seconds=0) == 0


@pytest.mark.parametrize("kwargs,fix", [
    (dict(frame_pool=0), "frame_pool 0: pass a whole number >= 1"),
    (dict(frame_pool=1.5), "frame_pool 1.5: pass a whole number >= 1"),
    (dict(store="pooled"), f"choose one of {STORES}"),
    (dict(dtype="bfloat16"), f"choose one of {tuple(ITEMSIZES)}"),
    (dict(mode="full"), f"choose one of {MODES}"),
    (dict(seconds=-1.0), "pass the audio duration in seconds, >= 0"),
    (dict(seconds=10, utterances=0), "utterances 0: pass a whole number >= 1"),
    (dict(mean_duration=0), "pass a mean utterance duration in seconds, > 0"),
])
def test_bad_input_is_refused_with_the_fix(kwargs, fix):
    with pytest.raises(OptionError) as err:
        cache_bytes(*BASE, **kwargs)
    assert fix in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(OptionError, match="n_states 0"):
        cache_bytes(0, 512)


def test_constants_agree_with_the_encoder_and_cache():
    from ser_cache.cache import DTYPES
    from ser_cache.encoder import MODES as ENCODER_MODES, N_WINDOW_FRAMES as ENCODER_WINDOW

    assert MODES == ENCODER_MODES and N_WINDOW_FRAMES == ENCODER_WINDOW
    assert tuple(ITEMSIZES) == DTYPES


def test_table_has_every_model_and_column():
    table = storage_table()
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    for column in ("frames", "pooled x2", "pooled x4", "pooled x8", "statistics"):
        assert column in header
    rows = lines[lines.index(header) + 2:]  # after the header and its alignment row
    assert len(rows) == len(WHISPER_SHAPES)
    for name, (states, dim), row in zip(WHISPER_SHAPES, WHISPER_SHAPES.values(), rows):
        assert row.startswith(f"| {name} ({states} x {dim}) |")
        assert row.count("|") == header.count("|")
    assert "3.7 s" in table and "float16" in table and "10^9 bytes" in table


def test_describe_estimate_is_one_line_with_the_layout():
    line = describe_estimate(*BASE, seconds=5310, utterances=1440)
    assert line.startswith("about 1.9 GB (7 states x 512, trim frames, float16, 5310 s of audio in 1440 utterances)")
    assert "pooled x4" in describe_estimate(*BASE, seconds=5310, utterances=1440, frame_pool=4)
    assert "statistics" in describe_estimate(*BASE, seconds=5310, utterances=1440, store="stats")
    assert "\n" not in line
