"""Utterance records: numeric targets, the JSON Lines round trip, and the records hash."""
from __future__ import annotations

import hashlib
import json

import pytest

from ser_cache.records import (
    RecordsError,
    Utterance,
    load_records,
    records_hash,
    save_records,
    target_names,
    validate,
)


def utt(i: int, **kw) -> Utterance:
    return Utterance(id=f"u{i}", path=f"/c/u{i}.wav", label="angry" if i % 2 else "sad",
                     speaker=f"s{i % 3}", group="g1" if i < 2 else "g2", duration=1.5, **kw)


def hash_before_targets(records) -> str:
    """The records hash as it was computed before records had targets."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.id):
        h.update(json.dumps([r.id, r.label, r.speaker, r.group]).encode())
        h.update(b"\n")
    return h.hexdigest()


def test_targets_default_empty_and_are_stored_as_sorted_pairs():
    assert utt(0).targets == ()
    r = utt(0, targets={"valence": 2, "arousal": 3.5})
    assert r.targets == (("arousal", 3.5), ("valence", 2.0))
    assert r == utt(0, targets=[("valence", 2.0), ("arousal", 3.5)])  # order does not matter
    assert dict(r.targets) == {"arousal": 3.5, "valence": 2.0}
    hash(r)  # still hashable, as a frozen record should be
    with pytest.raises(RecordsError, match="names a target twice"):
        utt(0, targets=[("arousal", 1.0), ("arousal", 2.0)])


def test_hash_without_targets_is_unchanged():
    records = [utt(i) for i in range(5)]
    assert records_hash(records) == hash_before_targets(records)
    assert records_hash(records[::-1]) == records_hash(records)


def test_hash_includes_targets():
    plain = [utt(i) for i in range(3)]
    rated = [utt(i, targets={"arousal": 1.0 + i}) for i in range(3)]
    other = [utt(i, targets={"arousal": 2.0 + i}) for i in range(3)]
    renamed = [utt(i, targets={"valence": 1.0 + i}) for i in range(3)]
    hashes = {records_hash(rs) for rs in (plain, rated, other, renamed)}
    assert len(hashes) == 4
    assert records_hash(rated) == records_hash([utt(i, targets={"arousal": 1.0 + i})
                                                for i in reversed(range(3))])


def test_round_trip_with_and_without_targets(tmp_path):
    plain = [utt(i) for i in range(3)]
    rated = [utt(i, targets={"arousal": 0.25 * i, "valence": -1.5}) for i in range(3)]
    for records in (plain, rated):
        save_records(records, tmp_path / "records.jsonl")
        assert load_records(tmp_path / "records.jsonl") == records
    line = json.loads((tmp_path / "records.jsonl").read_text().splitlines()[1])
    assert line["targets"] == {"arousal": 0.25, "valence": -1.5}  # readable as an object
    save_records(plain, tmp_path / "plain.jsonl")
    assert all("targets" not in json.loads(x) for x in (tmp_path / "plain.jsonl").open())


def test_records_written_before_targets_still_load(tmp_path):
    old = tmp_path / "records.jsonl"
    old.write_text('{"id": "a", "path": "/c/a.wav", "label": "sad", "speaker": "s1", "group": "", '
                   '"duration": 1.0, "original_label": "sad"}\n', encoding="utf-8")
    (r,) = load_records(old)
    assert r.targets == () and r.label == "sad"
    assert records_hash([r]) == hash_before_targets([r])


def test_validate_refuses_non_finite_and_uneven_targets():
    validate([utt(i, targets={"arousal": 1.0}) for i in range(3)])
    with pytest.raises(RecordsError, match=r"'u1' has target arousal = nan"):
        validate([utt(0, targets={"arousal": 1.0}), utt(1, targets={"arousal": float("nan")})])
    with pytest.raises(RecordsError, match=r"'u1' has targets \[\] but 'u0' has \['arousal'\]"):
        validate([utt(0, targets={"arousal": 1.0}), utt(1)])
    assert target_names([utt(0, targets={"v": 1, "a": 2})]) == ["a", "v"]
    assert target_names([utt(0)]) == []
