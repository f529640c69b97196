"""Download, unpack and verification against a tiny HTTP server on 127.0.0.1; no outside network.

Fixture releases are a few bytes per file, laid out like the real archives; their checksum
lists are written to a temp folder that `download.CHECKSUM_DIR` is pointed at.
"""
from __future__ import annotations

import hashlib
import io
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from ser_cache import download as dl
from ser_cache.cli import main

# Per corpus: archive name -> {path inside the zip: content}.
RELEASES = {
    "ravdess": {"Audio_Speech_Actors_01-24.zip": {
        f"Actor_{a:02d}/03-01-0{e}-01-01-01-{a:02d}.wav": f"ravdess {a} {e}".encode() * 50
        for a in (1, 2) for e in (1, 5)
    }},
    "emodb": {"download.zip": {
        "wav/03a01Fa.wav": b"emodb a" * 40, "wav/03a01Nc.wav": b"emodb b" * 40,
        "lablaut/03a01Fa.lab": b"labels", "erklaerung.txt": b"readme",
    }},
    "shemo": {"female.zip": {"female/F01A01.wav": b"f" * 300},
              "male.zip": {"male/M01A01.wav": b"m" * 300}},
}


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def listed(corpus: str) -> dict[str, bytes]:
    """{path relative to the corpus's subfolder: content} of the files its list should name."""
    prefix = "" if dl.RELEASES[corpus].subfolder == "." else dl.RELEASES[corpus].subfolder + "/"
    return {name[len(prefix):]: data for files in RELEASES[corpus].values()
            for name, data in files.items() if name.startswith(prefix)}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        name = self.path.split("?")[0].lstrip("/")
        rng = self.headers.get("Range")
        srv.requests.append((name, rng))
        if name not in srv.files:
            self.send_error(404)
            return
        data = srv.files[name]
        start = 0
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops > 0:  # promise the whole body, send part of it, hang up
            srv.drops -= 1
            self.wfile.write(body[: srv.drop_after])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.delenv(dl.ENV_BASE, raising=False)
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.ignore_range, srv.drops, srv.drop_after = {}, [], False, 0, 0
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def release(server, tmp_path, monkeypatch):
    """Serve a corpus's fixture archives and point the module at a matching checksum list."""
    sums_dir = tmp_path / "checksums"
    sums_dir.mkdir()
    monkeypatch.setattr(dl, "CHECKSUM_DIR", sums_dir)

    def publish(corpus: str, files: dict[str, dict[str, bytes]] | None = None,
                sums: dict[str, bytes] | None = None):
        for name, members in (files or RELEASES[corpus]).items():
            server.files[name] = zip_bytes(members)
        if dl.RELEASES[corpus].checksums:
            lines = [f"{hashlib.sha256(d).hexdigest()}  {rel}\n"
                     for rel, d in (sums or listed(corpus)).items()]
            (sums_dir / dl.RELEASES[corpus].checksums).write_text("".join(lines))
        return server

    return publish


@pytest.mark.parametrize("corpus, folder", [("ravdess", "."), ("emodb", "wav")])
def test_clean_download_unpacks_and_verifies(release, tmp_path, corpus, folder):
    srv = release(corpus)
    to = tmp_path / "corpus"
    report = dl.download(corpus, to, base_url=srv.url, progress=False)
    assert report.passed and report.ok == len(listed(corpus)) > 0
    assert report.folder == to / folder
    assert report.corpus_dir == to  # the layout the recipes document: Actor_XX/ or wav/ inside
    assert (to / dl.MARKER).exists()
    for rel, data in listed(corpus).items():
        assert (to / folder / rel).read_bytes() == data
    assert all(rng is None for _, rng in srv.requests)
    assert not list(to.rglob("*.part"))


def test_shemo_fetches_both_archives_and_says_it_is_not_verified(release, tmp_path):
    srv = release("shemo")
    report = dl.download("shemo", tmp_path / "shemo", base_url=srv.url, progress=False)
    assert {n for n, _ in srv.requests} == {"female.zip", "male.zip"}
    assert (tmp_path / "shemo/female/F01A01.wav").exists()
    assert (tmp_path / "shemo/male/M01A01.wav").exists()
    assert report.passed and report.listed == 0
    assert "no checksum list shipped" in report.summary()


def test_dropped_connection_resumes_with_a_range_request(release, tmp_path):
    srv = release("ravdess")
    srv.drops, srv.drop_after = 2, 100
    dl.download("ravdess", tmp_path / "r", base_url=srv.url, progress=False)
    name = "Audio_Speech_Actors_01-24.zip"
    assert (tmp_path / "r" / dl.ARCHIVE_DIR / name).read_bytes() == srv.files[name]
    assert [rng for _, rng in srv.requests] == [None, "bytes=100-", "bytes=200-"]


def test_server_ignoring_range_restarts_from_zero(release, tmp_path):
    srv = release("ravdess")
    srv.drops, srv.drop_after, srv.ignore_range = 1, 100, True
    report = dl.download("ravdess", tmp_path / "r", base_url=srv.url, progress=False)
    name = "Audio_Speech_Actors_01-24.zip"
    assert (tmp_path / "r" / dl.ARCHIVE_DIR / name).read_bytes() == srv.files[name]
    assert [rng for _, rng in srv.requests] == [None, "bytes=100-"]
    assert report.passed


def test_gives_up_when_no_byte_arrives_and_resumes_next_time(release, tmp_path):
    srv = release("ravdess")
    srv.drops, srv.drop_after = dl.RETRIES, 0
    with pytest.raises(dl.DownloadError, match="gave up"):
        dl.download("ravdess", tmp_path / "r", base_url=srv.url, progress=False)
    assert len(srv.requests) == dl.RETRIES
    assert dl.download("ravdess", tmp_path / "r", base_url=srv.url, progress=False).passed


def test_missing_archive_is_a_clear_error_without_retries(release, tmp_path):
    srv = release("ravdess")
    srv.files.clear()
    with pytest.raises(dl.DownloadError, match="404.*by hand"):
        dl.download("ravdess", tmp_path / "r", base_url=srv.url, progress=False)
    assert len(srv.requests) == 1


def flipped_byte_zip() -> bytes:
    """A deflated zip whose member data has one byte changed: it opens, but fails on reading."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("Actor_01/a.wav", bytes(range(256)) * 40)
    data = bytearray(buf.getvalue())
    data[60] ^= 0xFF  # inside the compressed data, after the 30 + 14 byte local header
    return bytes(data)


@pytest.mark.parametrize("payload, hint", [
    (b"<html>not a zip</html>" * 20, "not a valid zip"),
    (flipped_byte_zip(), "not a valid zip"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "LFS pointer"),
])
def test_corrupt_archive_is_refused_deleted_and_leaves_no_marker(release, tmp_path, payload, hint):
    srv = release("ravdess")
    srv.files["Audio_Speech_Actors_01-24.zip"] = payload
    with pytest.raises(dl.DownloadError, match=hint):
        dl.download("ravdess", tmp_path / "r", base_url=srv.url, progress=False)
    assert not (tmp_path / "r" / dl.MARKER).exists()
    assert not (tmp_path / "r" / dl.ARCHIVE_DIR / "Audio_Speech_Actors_01-24.zip").exists()


def test_altered_file_in_archive_fails_the_cli_and_names_it(release, tmp_path):
    files = dict(RELEASES["ravdess"]["Audio_Speech_Actors_01-24.zip"])
    bad = next(iter(files))
    files[bad] = b"not the original"
    srv = release("ravdess", {"Audio_Speech_Actors_01-24.zip": files}, sums=listed("ravdess"))
    result = CliRunner().invoke(main, ["download", "ravdess", "--to", str(tmp_path / "r")],
                                env={dl.ENV_BASE: srv.url})
    assert result.exit_code != 0
    assert "1 altered" in result.output and bad in result.output
    assert not (tmp_path / "r" / dl.MARKER).exists()


def test_missing_file_is_reported(release, tmp_path):
    files = dict(RELEASES["ravdess"]["Audio_Speech_Actors_01-24.zip"])
    gone = files.popitem()[0]
    srv = release("ravdess", {"Audio_Speech_Actors_01-24.zip": files}, sums=listed("ravdess"))
    with pytest.raises(dl.VerificationError) as e:
        dl.download("ravdess", tmp_path / "r", base_url=srv.url, progress=False)
    assert e.value.report.missing == [gone]
    assert "1 missing" in str(e.value) and gone in str(e.value)


@pytest.mark.parametrize("evil", ["../evil.wav", "/tmp/evil.wav", "Actor_01/../../evil.wav"])
def test_zip_slip_entry_refuses_the_whole_archive(release, tmp_path, evil):
    files = {"Actor_01/a.wav": b"a", evil: b"owned"}
    srv = release("ravdess", {"Audio_Speech_Actors_01-24.zip": files},
                  sums={"Actor_01/a.wav": b"a"})
    to = tmp_path / "deep" / "r"
    with pytest.raises(dl.DownloadError, match="zip-slip"):
        dl.download("ravdess", to, base_url=srv.url, progress=False)
    assert not (tmp_path / "deep" / "evil.wav").exists() and not (tmp_path / "evil.wav").exists()
    assert not (to / "Actor_01").exists()  # nothing unpacked, not even the good entry


def test_rerun_after_completion_downloads_nothing(release, tmp_path):
    srv = release("ravdess")
    to = tmp_path / "r"
    dl.download("ravdess", to, base_url=srv.url, progress=False)
    n = len(srv.requests)
    srv.files.clear()  # a second fetch would now fail loudly
    report = dl.download("ravdess", to, base_url=srv.url, progress=False)
    assert report.passed and len(srv.requests) == n


def test_rerun_notices_a_file_altered_after_the_download(release, tmp_path):
    srv = release("ravdess")
    to = tmp_path / "r"
    dl.download("ravdess", to, base_url=srv.url, progress=False)
    victim = next(iter(listed("ravdess")))
    (to / victim).write_bytes(b"edited")
    with pytest.raises(dl.VerificationError, match=re.escape(victim)):
        dl.download("ravdess", to, base_url=srv.url, progress=False)


def test_part_file_already_complete_is_accepted(release, tmp_path):
    srv = release("ravdess")
    name = "Audio_Speech_Actors_01-24.zip"
    part = tmp_path / "r" / dl.ARCHIVE_DIR / f"{name}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(srv.files[name])
    assert dl.download("ravdess", tmp_path / "r", base_url=srv.url, progress=False).passed
    assert srv.requests == [(name, f"bytes={len(srv.files[name])}-")]


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@pytest.mark.parametrize("given", [".", "..", "wav"])
def test_check_corpus_accepts_the_folder_its_parent_or_the_list_folder(release, tmp_path, given):
    release("emodb")
    top = tmp_path / "data" / "emodb"
    write_tree(top, {n: d for n, d in RELEASES["emodb"]["download.zip"].items()})
    (top / "wav" / "notes.txt").write_text("mine")
    report = dl.check_corpus("emodb", (top / given).resolve(), progress=False)
    assert report.passed and report.folder == top / "wav" and report.corpus_dir == top
    assert report.extra == ["notes.txt"]


def test_check_corpus_cli_fails_on_an_altered_file_and_names_it(release, tmp_path):
    release("ravdess")
    files = listed("ravdess")
    victim = sorted(files)[-1]
    write_tree(tmp_path / "r", {**files, victim: b"changed"})
    result = CliRunner().invoke(main, ["check-corpus", str(tmp_path / "r"), "--corpus", "ravdess"])
    assert result.exit_code != 0
    assert f"release: {victim} differs from the published file (SHA-256): download it again" in result.output
    write_tree(tmp_path / "r", files)
    result = CliRunner().invoke(main, ["check-corpus", str(tmp_path / "r"), "--corpus", "ravdess"])
    # the fixture's files are not audio (unreadable: other lines), but the release is intact
    assert f"release: {len(files)} files listed in the published SHA-256 list, {len(files)} identical" in result.output
    assert "differs from the published file" not in result.output and "is missing from" not in result.output


def test_check_corpus_on_converted_files_says_so_instead_of_listing_missing(release, tmp_path):
    release("ravdess")
    write_tree(tmp_path / "r", {rel.replace(".wav", ".flac"): b"flac" for rel in listed("ravdess")})
    report = dl.check_corpus("ravdess", tmp_path / "r", progress=False)
    assert not report.passed and not report.missing
    assert len(report.converted) == len(listed("ravdess"))
    assert "not the files of the original release" in report.summary()


def test_load_checksums_refuses_a_malformed_line(tmp_path):
    (tmp_path / "x.sha256").write_text(f"{'a' * 64}  ok.wav\nnot a checksum line\n")
    with pytest.raises(ValueError, match="x.sha256:2"):
        dl.load_checksums("x.sha256", tmp_path)


def test_shipped_lists_parse_and_match_their_corpora():
    for name, c in dl.RELEASES.items():
        if c.checksums:
            sums = dl.load_checksums(c.checksums)
            assert len(sums) > 400 and all(len(h) == 64 for h in sums.values()), name
    assert dl.RELEASES["shemo"].checksums is None
