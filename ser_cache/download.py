"""Download the public corpora and verify them file by file against shipped SHA-256 lists.

`download(corpus, to)` fetches a corpus's release archives into `TO/archives/` (resumable:
a `.part` file grows with HTTP Range requests until it is complete, then is renamed), unpacks
them into TO (refusing any entry that would land outside it), checks every unpacked file
against `checksums/<corpus>.sha256`, and only then writes the completion marker
`TO/.ser-cache-download.json`. Running it again after that downloads nothing and only
re-verifies. `check_corpus(corpus, folder)` runs the same verification on a copy a user already
has (`ser-cache check-corpus FOLDER --corpus NAME` runs it with its other checks). Layout after `download ravdess --to data/ravdess`:

    data/ravdess/
        archives/Audio_Speech_Actors_01-24.zip   kept, so that unpacking again needs no download
        Actor_01/03-01-01-01-01-01-01.wav ...    the release as it unpacks
        .ser-cache-download.json                 completion marker

Where each corpus comes from is part of its recipe (`Release` in corpora/<corpus>.py, gathered
in corpora.RELEASES): ravdess, emodb and shemo can be downloaded; cremad, tess, savee and
jl_corpus can only be checked (corpora/other_releases.py). None of the sources can be reached
from the test machine; tests serve fixture archives from 127.0.0.1 through `base_url`, or the
env var SER_CACHE_DOWNLOAD_BASE, which also serves a mirror.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .corpora import RELEASES, Release
from .errors import UserError

log = logging.getLogger(__name__)

CHECKSUM_DIR = Path(__file__).parent / "checksums"  # read at call time: tests point it elsewhere
ENV_BASE = "SER_CACHE_DOWNLOAD_BASE"
ARCHIVE_DIR = "archives"
MARKER = ".ser-cache-download.json"
CHUNK = 1 << 20  # 1 MiB per read, for downloads and hashing alike
RETRIES = 4  # attempts in a row that gain no byte before giving up
BACKOFF_S = 1.0  # wait before retry k is BACKOFF_S * 2**k seconds
TIMEOUT_S = 60.0  # per socket operation, not per download
SHOW = 5  # names listed per problem in a summary
USER_AGENT = "ser-cache (corpus download)"
LFS_POINTER = b"version https://git-lfs"  # what a Git LFS file looks like when LFS did not serve it


DOWNLOADABLE = sorted(n for n, c in RELEASES.items() if c.archives)


class DownloadError(UserError, RuntimeError):
    """A download, an archive or a corpus folder that cannot be used; the message names the fix."""


class VerificationError(DownloadError):
    """Files missing or differing from the checksum list; `.report` holds the details."""

    def __init__(self, report: Report, hint: str = ""):
        super().__init__(report.summary() + (f"\n{hint}" if hint else ""))
        self.report = report


@dataclass
class Report:
    """Outcome of checking a corpus folder against its checksum list.

    folder: where the list's paths were looked up (see `corpus_dir` for `ser-cache extract`).
    listed: number of files in the list; 0 when none is shipped (then nothing was verified).
    missing / altered: listed files absent / with another SHA-256 (errors).
    converted: listed files absent but present under another extension (not the original release).
    extra: files under the folder that the list does not name (information only).
    """

    corpus: str
    folder: Path
    listed: int
    ok: int = 0
    missing: list[str] = field(default_factory=list)
    altered: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def passed(self) -> bool:
        return not (self.missing or self.altered or self.converted)

    @property
    def corpus_dir(self) -> Path:
        """The folder to pass to `ser-cache extract`: `folder` without the corpus's subfolder
        (data/emodb for data/emodb/wav), which is the layout the corpus recipes (corpora/) document."""
        sub = RELEASES[self.corpus].subfolder
        if sub != "." and self.folder.as_posix().endswith("/" + sub):
            return self.folder.parents[len(PurePosixPath(sub).parts) - 1]
        return self.folder

    def summary(self) -> str:
        if self.note:
            return f"{self.corpus} in {self.folder}: {self.note}"
        if self.converted and not self.ok:
            # One clear sentence instead of a wall of "missing".
            return (
                f"{self.corpus} in {self.folder}: these are not the files of the original release: "
                f"{len(self.converted)} of {self.listed} listed files exist only in another format "
                f"({_names(self.converted)}). The checksums cover the original release only; "
                "check the original download instead, or skip the check."
            )
        if self.listed and len(self.missing) == self.listed:
            return (f"{self.corpus} in {self.folder}: none of the {self.listed} listed files is "
                    f"there (expected paths like {self.missing[0]} relative to it): give the "
                    "folder that holds the corpus")
        lines = [
            f"{self.corpus} in {self.folder}: {self.listed} listed files, {self.ok} ok, "
            f"{len(self.missing)} missing, {len(self.altered)} altered"
            + (f", {len(self.converted)} in another format" if self.converted else "")
            + f"; {len(self.extra)} files not in the list (ignored)"
        ]
        for what, names in (("missing", self.missing), ("altered (SHA-256 differs)", self.altered),
                            ("in another format", self.converted), ("not in the list", self.extra)):
            if names:
                lines.append(f"  {what}: {_names(names)}")
        return "\n".join(lines)


def _names(names: list[str]) -> str:
    more = f" and {len(names) - SHOW} more" if len(names) > SHOW else ""
    return ", ".join(names[:SHOW]) + more


def release_of(name: str) -> Release:
    """The release of corpus `name`; DownloadError naming the known ones when there is none."""
    if name not in RELEASES:
        raise DownloadError(f"unknown corpus {name!r}; known corpora = {sorted(RELEASES)}")
    return RELEASES[name]


def load_checksums(list_name: str, folder: Path | None = None) -> dict[str, str]:
    """{relative posix path: sha256 hex} from a `sha256sum` file in `folder` (CHECKSUM_DIR)."""
    path = Path(folder or CHECKSUM_DIR) / list_name
    sums = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if not m:
            raise ValueError(f"{path}:{i}: not a `sha256sum` line: {line[:80]!r}")
        sums[m[2]] = m[1].lower()
    return sums


def sha256_of(path: Path) -> str:
    """SHA-256 hex of a file, read in CHUNK pieces into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# --- verification ------------------------------------------------------------------------------

def verify(corpus: str, root: Path, progress: bool = True) -> Report:
    """Check every file of the corpus's list under `root` (the folder its paths are relative to)."""
    c = release_of(corpus)
    if c.checksums is None:
        return Report(corpus, root, 0, note="no checksum list shipped; files were not verified")
    sums = load_checksums(c.checksums)
    report = Report(corpus, root, len(sums))
    listings: dict[Path, dict[str, list[str]]] = {}
    present = []
    for rel in sums:
        p = root / rel
        if p.is_file():
            present.append(rel)
        elif other := _other_formats(p, listings):
            report.converted.append(str(PurePosixPath(rel).with_name(other[0])))
        else:
            report.missing.append(rel)
    # hashlib releases the GIL on large updates, so threads give real parallel hashing.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda rel: sha256_of(root / rel), present)
        for rel, digest in tqdm(zip(present, digests), total=len(present), desc=f"verify {corpus}",
                                unit="file", disable=None if progress else True):
            if digest == sums[rel]:
                report.ok += 1
            else:
                report.altered.append(rel)
    report.extra = sorted(
        rel for p in root.rglob("*")
        if p.is_file() and (rel := p.relative_to(root).as_posix()) not in sums
        and rel != MARKER and not rel.startswith(f"{ARCHIVE_DIR}/")
    )
    return report


def _other_formats(path: Path, listings: dict) -> list[str]:
    """Names of files beside `path` with its stem and another extension (e.g. a FLAC copy)."""
    if path.parent not in listings:
        by_stem: dict[str, list[str]] = {}
        if path.parent.is_dir():
            for name in sorted(os.listdir(path.parent)):
                by_stem.setdefault(Path(name).stem, []).append(name)
        listings[path.parent] = by_stem
    return [n for n in listings[path.parent].get(path.stem, []) if n != path.name]


def check_corpus(corpus: str, folder: Path, progress: bool = True) -> Report:
    """Verify a corpus a user already has. `folder` may be the corpus folder, the folder its
    checksum paths are relative to (e.g. EmoDB's wav/), or the parent of either."""
    c = release_of(corpus)
    folder = Path(folder)
    if not folder.is_dir():
        raise DownloadError(f"{folder} is not a folder: give the folder that holds {corpus}")
    if c.checksums is None:
        return verify(corpus, folder, progress)
    return verify(corpus, _find_root(c, folder), progress)


def _find_root(c: Release, folder: Path, sample_size: int = 100) -> Path:
    """The candidate (FOLDER, FOLDER/subfolder, or either one level down) holding the most of a
    sample of listed files, as originals first and in another format second."""
    rels = list(load_checksums(c.checksums))
    sample = rels[:: max(1, len(rels) // sample_size)]
    bases = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    candidates = list(dict.fromkeys(r for b in bases for r in (b, b / c.subfolder) if r.is_dir()))
    listings: dict = {}

    def score(root: Path) -> tuple[int, int]:
        found = [(root / rel).is_file() for rel in sample]
        other = [not f and bool(_other_formats(root / rel, listings))
                 for f, rel in zip(found, sample)]
        return sum(found), sum(other)

    best = max(candidates, key=score)  # the first of equals: the folder itself wins ties
    if score(best) == (0, 0) and (folder / c.subfolder).is_dir():
        return folder / c.subfolder
    return best


# --- download ----------------------------------------------------------------------------------

def download(corpus: str, to: Path, base_url: str | None = None, progress: bool = True) -> Report:
    """Download, unpack and verify a corpus into `to`; returns the verification report.

    base_url: fetch each archive as f"{base_url}/{archive name}" instead of from its source
        (default: env var SER_CACHE_DOWNLOAD_BASE, if set).
    Raises DownloadError when an archive cannot be fetched or unpacked, VerificationError when
    files are missing or altered; the completion marker is written only after a clean check.
    """
    c = release_of(corpus)
    if not c.archives:
        raise DownloadError(f"{corpus} cannot be downloaded by ser-cache; "
                            f"downloadable = {DOWNLOADABLE}")
    to = Path(to)
    marker = to / MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("corpus") != corpus:
            raise DownloadError(f"{to} already holds {done.get('corpus')!r}: choose another --to")
        log.info("%s already downloaded into %s; verifying only", corpus, to)
        report = verify(corpus, to / c.subfolder, progress)
        if not report.passed:
            raise VerificationError(report, "The files changed after the download; delete "
                                            f"{marker} to unpack the archives again.")
        return report

    base_url = base_url or os.environ.get(ENV_BASE)
    fetched = {}
    for name, url in c.archives:
        if base_url:
            url = f"{base_url.rstrip('/')}/{name}"
        path = fetch(url, to / ARCHIVE_DIR / name, progress)
        unpack(path, to, progress)
        fetched[name] = {"url": url, "bytes": path.stat().st_size}
    report = verify(corpus, to / c.subfolder, progress)
    if not report.passed:
        raise VerificationError(report, f"The archives in {to / ARCHIVE_DIR} do not hold the "
                                        "original release; delete them and run again to download "
                                        "them afresh.")
    marker.write_text(json.dumps({"corpus": corpus, "archives": fetched, "folder": c.subfolder,
                                  "verified_files": report.ok, "time": time.time()}, indent=1))
    return report


def fetch(url: str, dest: Path, progress: bool = True) -> Path:
    """Download `url` to `dest`, resuming `dest.part` with Range requests; no-op if `dest` exists.

    A server that ignores Range (200 instead of 206) makes the download restart from byte 0.
    A dropped connection is retried RETRIES times in a row with growing waits; any attempt that
    gains bytes resets the count, so a long download over a flaky link still finishes.
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    fails = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            total = _fetch_once(url, part, have, progress)
            size = part.stat().st_size
            if total is None or size == total:
                part.replace(dest)
                return dest
            reason = f"connection closed at byte {size} of {total}"
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                if _range_total(e.headers.get("Content-Range")) == have:
                    part.replace(dest)  # the .part was complete already
                    return dest
                part.unlink()  # longer than the file: a leftover of another version
                continue
            if e.code < 500 and e.code not in (408, 429):  # timeout, too many requests: retry
                raise DownloadError(
                    f"{url} answered {e.code} {e.reason}; the release may have moved: download "
                    f"{dest.name} by hand into {dest.parent} and run again") from e
            reason = f"{e.code} {e.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = str(getattr(e, "reason", e)) or type(e).__name__
        gained = (part.stat().st_size if part.exists() else 0) > have
        fails = 0 if gained else fails + 1
        if fails >= RETRIES:
            raise DownloadError(f"gave up on {url} after {RETRIES} attempts ({reason}); run again "
                                f"to resume from the {part.name} kept in {part.parent}")
        wait = BACKOFF_S * 2 ** fails
        log.warning("%s: %s; retrying in %.1f s", dest.name, reason, wait)
        time.sleep(wait)


def _fetch_once(url: str, part: Path, have: int, progress: bool) -> int | None:
    """One request appending to `part` from byte `have`; returns the full size if the server
    said it."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:
        length = r.headers.get("Content-Length")
        if have and r.status == 206:
            got = r.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {have}-"):
                part.unlink()  # a range we did not ask for: trust nothing, start again
                raise http.client.HTTPException(f"asked for bytes {have}-, got {got!r}")
            total = _range_total(r.headers["Content-Range"])
            mode = "ab"
        else:
            if have:
                log.warning("%s: server ignored the Range request; starting again", part.name)
            have, mode = 0, "wb"
            total = int(length) if length else None
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[: -len(".part")],
                                         disable=None if progress else True) as bar:
            while chunk := r.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _range_total(content_range: str | None) -> int | None:
    """The full size in 'bytes 0-99/1234' or 'bytes */1234'."""
    m = re.search(r"/(\d+)\s*$", content_range or "")
    return int(m[1]) if m else None


def unpack(archive: Path, to: Path, progress: bool = True) -> None:
    """Unpack a zip into `to`, refusing the whole archive if any entry would land outside it.

    A broken archive (not a zip, or a CRC error) is deleted so that the next run fetches it again.
    """
    root = to.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                name = info.filename
                dest = (root / name).resolve()
                if (name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name)
                        or not dest.is_relative_to(root)):
                    raise DownloadError(f"{archive.name} has an entry that would land outside "
                                        f"{to}: {name!r}; refusing to unpack it (zip-slip)")
            for info in tqdm(members, desc=f"unpack {archive.name}", unit="file",
                             disable=None if progress else True):
                dest = root / info.filename
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # not a zip; bad CRC; cut short
        with open(archive, "rb") as f:
            head = f.read(100)
        archive.unlink(missing_ok=True)
        hint = " (it is a Git LFS pointer, not the archive)" if head.startswith(LFS_POINTER) else ""
        raise DownloadError(f"{archive.name} is not a valid zip archive{hint}: {e}; it was "
                            "deleted, run again to download it afresh") from e
