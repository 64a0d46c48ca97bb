"""Getting the MSD tasks: download with resume and MD5, safe extraction, and a task folder put in place at once.

``beseg data download task09`` and ``beseg reproduce --download`` call :func:`install_task`. The
Medical Segmentation Decathlon archives (``Task01_BrainTumour.tar``, about 7.1 GB;
``Task09_Spleen.tar``, about 1.5 GB) come from the public mirror MONAI's ``DecathlonDataset``
downloads from, and are checked against the same MD5 sums (:data:`MSD_ARCHIVES`). The data are
licensed CC-BY-SA 4.0 (:data:`MSD_LICENCE`); beseg says so whenever it downloads or unpacks them.

What :func:`install_task` guarantees, each with a test in ``tests/test_download.py``:

* **Resume.** The archive is fetched into ``<archive>.part``. A cut connection is retried in the
  same call with an HTTP ``Range`` request for the rest (``If-Range`` with the server's ETag or
  Last-Modified, so a file that changed on the server is fetched whole again); an interrupted call
  (Ctrl-C, a killed job) leaves the ``.part`` file, and the next call continues it. A server that
  ignores ``Range`` (it answers ``200`` with the whole file) is handled by starting again from byte 0.
* **Checksum before extraction.** The MD5 is computed while the bytes arrive. A mismatch is one
  error line; the file is renamed aside (``<archive>.md5-mismatch``) and nothing is extracted. An
  archive already downloaded and verified is not fetched again (its size, modification time and
  MD5 are recorded beside it).
* **Safe extraction.** Every member is checked before anything is written: absolute paths, ``..``,
  symbolic and hard links whose target is absolute or goes up, devices, FIFOs and members larger
  than a limit are refused, naming the member. The extraction itself then runs through Python's
  ``tarfile`` ``data`` filter where it exists (3.12, and 3.11.4+), which resolves links on disk as a
  second line of defence.
* **Atomic placement.** The archive is unpacked into a hidden folder beside the target
  (``.<name>.extract-*``, on the same filesystem) and renamed into place once complete, with a
  marker file (:data:`MARKER`) saying where it came from. An interrupted extraction never leaves a
  half task folder that looks complete; its leftovers are removed by the next call.
* **Idempotent.** A task folder already in place from the same archive is not extracted again; a
  folder at the target that beseg did not make is never written into.
* **One process per task folder.** A lock file (``.<name>.lock`` beside the target) keeps two
  downloads or extractions of one task apart; a dead holder's lock is taken over.

Where the task folder goes is the caller's choice; :func:`data_root` is the default
(``$BESEG_DATA_DIR``, else ``$BESEG_CACHE/msd``). ``BESEG_MSD_MIRROR`` replaces the mirror's base URL
for a site. Only the standard library's ``urllib.request``, ``tarfile`` and ``hashlib`` and tqdm are
used.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from beseg.errors import ConfigError, DataError
from beseg.fileio import FileLock, LockBusyError, LockTimings, atomic_write_text

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES", "DEFAULT_MIRROR", "MARKER", "MSD_ARCHIVES", "MSD_LICENCE", "InstallResult",
    "MSDArchive", "archive_url", "data_root", "download_archive", "file_md5", "install_task", "safe_extract",
]


@dataclass(frozen=True)
class MSDArchive:
    """One MSD task archive.

    Attributes:
        task: beseg's task id (``task01``, ``task09``).
        folder: the task folder inside the archive (``Task09_Spleen``).
        md5: the archive's MD5, as in MONAI's ``DecathlonDataset.md5``.
        size_gb: its approximate size (GB), for messages.
    """

    task: str
    folder: str
    md5: str
    size_gb: float

    @property
    def filename(self) -> str:
        """The archive's file name on the mirror (``Task09_Spleen.tar``)."""
        return f"{self.folder}.tar"


#: The MSD archives beseg's presets are made for; the MD5 sums are MONAI 1.6's (``monai.apps.DecathlonDataset``).
MSD_ARCHIVES: dict[str, MSDArchive] = {
    "task01": MSDArchive("task01", "Task01_BrainTumour", "240a19d752f0d9e9101544901065d872", 7.1),
    "task09": MSDArchive("task09", "Task09_Spleen", "410d4a301da4e5b2f6f86ec3ddba524e", 1.5),
}
#: The public mirror of the MSD archives that MONAI's ``DecathlonDataset`` downloads from.
DEFAULT_MIRROR = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
#: Said wherever beseg downloads or unpacks an MSD archive.
MSD_LICENCE = ("the Medical Segmentation Decathlon data (medicaldecathlon.com) are licensed CC-BY-SA 4.0; cite "
               "Antonelli et al., Nature Communications 13:4128 (2022) when you publish results on them")
#: The file in a task folder that says beseg extracted it, and from which archive.
MARKER = ".beseg-download.json"
#: Members larger than this are refused (the largest file of an MSD archive is far below it).
DEFAULT_MAX_MEMBER_BYTES = 4 * 1024 ** 3
#: How often a downloader's lock beats, and how long a silent heartbeat marks its holder gone (seconds).
HEARTBEAT_S = 30.0
STALE_LOCK_S = 600.0
_CHUNK = 1 << 20


def _archive(task: str) -> MSDArchive:
    key = task.strip().lower()
    if key not in MSD_ARCHIVES:
        raise ConfigError(f"unknown MSD task {task!r}; choose one of {', '.join(MSD_ARCHIVES)}.")
    return MSD_ARCHIVES[key]


def data_root(to: str | Path | None = None) -> Path:
    """The folder task folders are downloaded into: ``to``, else ``$BESEG_DATA_DIR``, else ``$BESEG_CACHE/msd``
    (``~/.cache/beseg/msd`` without ``BESEG_CACHE``).

    One copy per user or site, shared by every results folder: beside the preprocessed store, which
    :func:`beseg.data.intensity.cache_base` already puts on the filesystem ``BESEG_CACHE`` names (on a
    cluster, a project or scratch filesystem every node sees rather than a small NFS home).
    """
    if to:
        return Path(to).expanduser()
    env = os.environ.get("BESEG_DATA_DIR")
    if env:
        return Path(env).expanduser()
    from beseg.data.intensity import cache_base

    return cache_base() / "msd"


def archive_url(task: str) -> str:
    """The archive's URL: ``$BESEG_MSD_MIRROR`` (a site's mirror) or :data:`DEFAULT_MIRROR`, then the file name."""
    base = os.environ.get("BESEG_MSD_MIRROR") or DEFAULT_MIRROR
    return f"{base.rstrip('/')}/{_archive(task).filename}"


def _check_md5(md5: str, what: str = "--md5") -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{32}", md5 or ""):
        raise ConfigError(f"{what} must be 32 hexadecimal digits (an MD5 sum), got {md5!r}.")
    return md5.lower()


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{int(n)} bytes"


# ----------------------------------------------------------------------------------------------
# the lock (one download or extraction per task folder)


class _Lock:
    """One download or extraction per task folder: a :class:`beseg.fileio.FileLock` beside the target, held
    for the whole call (its own thread keeps its heartbeat). A holder whose process is gone, or whose
    heartbeat stayed silent for :data:`STALE_LOCK_S`, is taken over with a note; a live one is refused in
    one line.
    """

    def __init__(self, path: Path, what: str, log: Callable[[str], None]) -> None:
        self.what = what
        self.lock = FileLock(path, LockTimings.from_env("DOWNLOAD_LOCK", HEARTBEAT_S, STALE_LOCK_S), label=what,
                             on_takeover=lambda message: log(f"note: {message}"))

    def __enter__(self) -> _Lock:
        try:
            self.lock.acquire()
        except LockBusyError as err:
            holder = err.holder or {}
            raise DataError(f"{self.what} is being downloaded or extracted by process {holder.get('pid', '?')} on "
                            f"{holder.get('host', '?')} (lock {self.lock.path}); wait for it to finish, then run the "
                            "same command again") from None
        return self

    def beat(self) -> None:
        """The fence, called as work progresses: a holder stopped so long that another process took the lock
        over stops here instead of writing beside it (:class:`beseg.fileio.LockLostError`)."""
        self.lock.check()

    def __exit__(self, *exc) -> None:
        self.lock.release()


# ----------------------------------------------------------------------------------------------
# download


class _Retry(Exception):
    """A transfer that stopped early for a reason that may pass (a cut connection, a timeout)."""


@dataclass
class _Partial:
    """The ``.part`` file being downloaded, the MD5 of its bytes so far, and the server's validator."""

    path: Path
    meta_path: Path
    url: str
    hasher: "hashlib._Hash"
    hashed: int = 0
    validator: str | None = None
    total: int | None = None

    @classmethod
    def open(cls, dest: Path, url: str, beat: Callable[[], None], progress: bool = False) -> _Partial:
        part = cls(dest.with_name(dest.name + ".part"), dest.with_name(f".{dest.name}.part.json"), url, hashlib.md5())
        meta = _read_json(part.meta_path)
        if part.path.exists() and meta.get("url") != url:
            part.restart()  # a partial file of another URL (or of unknown origin): its bytes cannot be trusted
        else:
            part.validator, part.total = meta.get("validator"), meta.get("total")
        part.sync(beat, progress)  # an earlier call's bytes: read once, so the MD5 can go on from there
        return part

    @property
    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def sync(self, beat: Callable[[], None], progress: bool = False) -> None:
        """Make the MD5 cover exactly the file's bytes (after a previous call, or a write that failed half-way)."""
        if self.hashed == self.size:
            return
        self.hasher, self.hashed = _md5_of(self.path, beat, progress), self.size

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self.hasher, self.hashed, self.validator, self.total = hashlib.md5(), 0, None, None

    def save_meta(self) -> None:
        atomic_write_text(self.meta_path, json.dumps({"url": self.url, "validator": self.validator,
                                                      "total": self.total}) + "\n")

    def append(self, f, chunk: bytes) -> None:
        """Write ``chunk`` to the open ``.part`` file ``f`` and add it to the MD5."""
        f.write(chunk)
        self.hasher.update(chunk)
        self.hashed += len(chunk)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _md5_of(path: Path, beat: Callable[[], None] = lambda: None, progress: bool = False) -> "hashlib._Hash":
    h = hashlib.md5()
    size = path.stat().st_size if path.exists() else 0
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"MD5 {path.name}",
              disable=not progress) as bar:
        if size:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    bar.update(len(chunk))
                    beat()
    return h


def file_md5(path: str | Path, progress: bool = False) -> str:
    """The MD5 of a file (hex), read in 1 MiB chunks, with an optional progress bar."""
    return _md5_of(Path(path), progress=progress).hexdigest()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> ``(START, TOTAL)``, ``None`` where absent."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start is not None else None), (int(total) if total != "*" else None)


def _write_error(path: Path, err: OSError, what: str) -> DataError:
    reason = err.strerror or str(err)
    return DataError(f"could not write {path}: {reason}; {what}")


def _check_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"not enough free space in {folder} for {what}: {_size(needed)} needed, {_size(free)} free; "
                        "free some space or choose another folder (--to, or BESEG_DATA_DIR)")


def _transfer(part: _Partial, timeout_s: float, progress: bool, log: Callable[[str], None],
              beat: Callable[[], None], room_to_unpack: bool = False) -> None:
    """One HTTP request for the rest of ``part``; returns when the file is complete.

    ``room_to_unpack``: the free space must hold the unpacked archive too (about its size again), so
    that a download that cannot be extracted fails before it starts, not after hours.

    Raises:
        _Retry: the connection broke or timed out (the bytes received so far are kept).
        DataError: the server refused (HTTP error), could not be reached, or a write failed.
    """
    offset = part.size
    if part.total is not None and offset == part.total:
        return  # complete already (an earlier call stopped between the last byte and the check)
    headers = {"User-Agent": f"beseg/{_version()} (python urllib)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if part.validator:
            headers["If-Range"] = part.validator  # the file changed on the server: 200 with all of it
    try:
        response = urllib.request.urlopen(urllib.request.Request(part.url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left after `offset`: complete, or longer than the file
            _, total = _content_range(err.headers.get("Content-Range"))
            if total == offset:
                part.total = total
                return
            log(f"note: {part.path} is longer than {part.url}; starting the download again")
            part.restart()
            raise _Retry("the partial file did not fit the server's") from None
        raise DataError(f"could not download {part.url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise _Retry(f"timed out connecting to {part.url}") from None
        raise DataError(f"could not download {part.url}: {err.reason}") from None
    except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as err:
        raise _Retry(f"{type(err).__name__}: {err}") from None
    with response:
        status = getattr(response, "status", None) or 200  # file:// URLs have no status
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                log(f"note: {part.url} sent another range than asked for; starting the download again")
                part.restart()
                raise _Retry("unexpected range")
        else:
            if offset:
                log(f"note: {part.url} does not resume downloads (it sent the whole file); starting again from "
                    "the beginning")
                part.restart()
                offset = 0
            total = length
        etag = response.headers.get("ETag")
        part.validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        part.total = total if total is not None else (offset + length if length is not None else None)
        part.save_meta()
        if part.total is not None:
            what = part.path.name + (" and its unpacked copy" if room_to_unpack else "")
            _check_space(part.path.parent, part.total - offset + (part.total if room_to_unpack else 0), what)
        bar = tqdm(total=part.total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=part.path.name[: -len(".part")], disable=not progress)
        try:
            with bar, open(part.path, "ab") as f:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as err:
                        raise _Retry(f"{type(err).__name__}: {err}") from None
                    if not chunk:
                        break
                    part.append(f, chunk)
                    bar.update(len(chunk))
                    beat()
        except OSError as err:  # the write, or the flush when the file closes (a full disk, a quota)
            raise _write_error(part.path, err, "the partial download is kept: free some space and run the same "
                                               "command again to resume") from None
    if part.total is not None and part.size < part.total:
        raise _Retry(f"the connection closed after {part.size} of {part.total} bytes")


def _aside(path: Path, suffix: str) -> Path:
    """A free name beside ``path`` ending in ``suffix`` (``x.tar.md5-mismatch``, then ``...-2``, ...)."""
    candidate, n = path.with_name(path.name + suffix), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}{suffix}-{n}")
    return candidate


def _verified_meta(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.verified.json")


def _already_verified(dest: Path, md5: str) -> bool:
    """True when ``dest`` is a download this module verified against ``md5`` and has not changed since."""
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    meta = _read_json(_verified_meta(dest))
    return meta.get("md5") == md5 and meta.get("size") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns


def _remember_verified(dest: Path, md5: str) -> None:
    st = dest.stat()
    atomic_write_text(_verified_meta(dest), json.dumps({"md5": md5, "size": st.st_size,
                                                        "mtime_ns": st.st_mtime_ns}) + "\n")


def download_archive(url: str, dest: str | Path, md5: str, *, progress: bool = True, retries: int = 5,
                     retry_wait_s: float = 2.0, timeout_s: float = 60.0, log: Callable[[str], None] = print,
                     beat: Callable[[], None] = lambda: None, room_to_unpack: bool = False) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``) and verify its MD5.

    Args:
        url: an ``http(s)://`` (or ``file://``) URL.
        dest: the file to create; nothing is fetched when it is already there and verified.
        md5: the expected MD5 (hex).
        progress: a tqdm bar with size and rate.
        retries: how many times a broken transfer is continued before giving up (each retry asks for
            the rest with ``Range``); the count starts again whenever bytes arrived.
        retry_wait_s: the wait before a retry that follows one without progress (doubling, at most 60 s).
        timeout_s: socket timeout (s) for connecting and for each read.
        log: receives notes (a server that does not resume, a retry).
        beat: called as bytes arrive (the caller's lock heartbeat).
        room_to_unpack: refuse to start unless the free space also holds the unpacked archive.

    Returns:
        ``dest``, verified.

    Raises:
        DataError: one line naming the URL or file: an HTTP error (404 ...), an unreachable server, a
            write that failed (a full disk: the ``.part`` file is kept for the next call), too many
            broken transfers (kept too), or an MD5 mismatch (the file is renamed aside, see
            :func:`_aside`).
    """
    dest = Path(dest)
    md5 = _check_md5(md5)
    if _already_verified(dest, md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _Partial.open(dest, url, beat, progress)
    failures, wait = 0, retry_wait_s
    while True:
        before = part.size
        try:
            _transfer(part, timeout_s, progress, log, beat, room_to_unpack)
            break
        except DataError as err:
            if part.size and "partial download is kept" not in str(err):
                raise DataError(f"{err}; the {part.size} bytes downloaded so far are kept in {part.path}: run the "
                                "same command again to resume") from None
            raise
        except _Retry as err:
            part.sync(beat)  # a chunk that failed half-way must not leave the MD5 behind the file
            if part.size > before:
                failures, wait = 0, retry_wait_s  # it moved: continue at once
            else:
                failures += 1
                if failures > retries:
                    raise DataError(f"could not download {url}: {err} ({retries} retries); the partial file "
                                    f"{part.path} is kept: run the same command again to resume") from None
                time.sleep(wait)
                wait = min(2 * wait, 60.0)
            log(f"note: the transfer of {url} stopped ({err}); resuming at byte {part.size}")
    actual = part.hasher.hexdigest()
    if actual != md5:
        aside = _aside(dest, ".md5-mismatch")
        os.replace(part.path, aside)
        part.meta_path.unlink(missing_ok=True)
        raise DataError(f"{url}: MD5 {actual} does not match the expected {md5}; nothing was extracted, and the file "
                        f"is kept aside as {aside}")
    os.replace(part.path, dest)
    part.meta_path.unlink(missing_ok=True)
    _remember_verified(dest, md5)
    return dest


# ----------------------------------------------------------------------------------------------
# safe extraction


def _member_problem(member: tarfile.TarInfo, max_member_bytes: int) -> str | None:
    """Why ``member`` must not be extracted, or None.

    Links are refused when their target is absolute or contains ``..`` at all, even one that would
    stay inside: resolving ``..`` lexically is not what the filesystem does when earlier links are
    on the path, and the MSD archives hold no links.
    """
    name = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or name.is_absolute() or re.match(r"^[A-Za-z]:", member.name):
        return "an absolute path"
    if ".." in name.parts:
        return "a path that goes up ('..')"
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        kind = "symbolic" if member.issym() else "hard"
        if member.linkname.startswith("/") or target.is_absolute() or ".." in target.parts:
            return f"a {kind} link to {member.linkname!r}, out of the folder"
        return None
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    if not (member.isfile() or member.isdir()):
        return f"an unsupported member type ({member.type!r})"
    if member.size > max_member_bytes:
        return f"{member.size} bytes, over the limit of {max_member_bytes} bytes per member"
    return None


def safe_extract(archive: str | Path, dest: str | Path, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 progress: bool = True, beat: Callable[[], None] = lambda: None, use_filter: bool | None = None) -> int:
    """Extract the tar ``archive`` into the existing folder ``dest``, refusing unsafe members.

    Every member is checked before the first is written (:func:`_member_problem`), so a refused
    archive writes nothing. The extraction then uses ``tarfile``'s ``data`` filter when this Python
    has it (``use_filter=None``), which also drops owners and unsafe permission bits.

    Args:
        archive: a tar file (plain or compressed).
        dest: the folder to extract into.
        max_member_bytes: members larger than this are refused.
        progress: a tqdm bar over the bytes extracted.
        beat: called after each member (the caller's lock heartbeat).
        use_filter: force the ``data`` filter on or off (off: the checks of this module alone, as on a
            Python without filters); None uses it where available.

    Returns:
        The number of bytes of the regular files extracted.

    Raises:
        DataError: not a tar file, or a member refused (naming it and why).
        OSError: a write failed (e.g. a full disk).
    """
    archive, dest = Path(archive), Path(dest)
    if use_filter is None:
        use_filter = hasattr(tarfile, "data_filter")
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, EOFError) as err:
        raise DataError(f"{archive}: not a readable tar archive ({err})") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError) as err:
            raise DataError(f"{archive}: damaged tar archive ({err})") from None
        for member in members:
            problem = _member_problem(member, max_member_bytes)
            if problem:
                raise DataError(f"{archive}: refusing member {member.name!r}: {problem}; nothing was extracted")
        total = sum(m.size for m in members if m.isfile())
        _check_space(dest, total, f"the {_size(total)} of {archive.name} unpacked")
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"unpacking {archive.name}",
                  disable=not progress) as bar:
            for member in members:
                try:
                    if use_filter:
                        tar.extract(member, dest, filter="data")
                    else:
                        tar.extract(member, dest, set_attrs=False)
                except tarfile.FilterError as err:
                    raise DataError(f"{archive}: refusing member {member.name!r}: {err}") from None
                except (tarfile.TarError, EOFError) as err:
                    raise DataError(f"{archive}: damaged tar archive at member {member.name!r} ({err})") from None
                if member.isfile():
                    bar.update(member.size)
                beat()
    return total


# ----------------------------------------------------------------------------------------------
# a task folder in place


@dataclass
class InstallResult:
    """What :func:`install_task` did.

    Attributes:
        task_dir: the task folder (holding ``dataset.json``).
        archive: the archive used, or None when the folder was in place already; a downloaded archive is
            removed after a successful extraction unless ``keep_archive`` (then :attr:`archive_kept`).
        downloaded: bytes were fetched in this call.
        extracted: the folder was unpacked in this call (False: it was in place already).
        archive_kept: the archive is still on disk.
    """

    task_dir: Path
    archive: Path | None = None
    downloaded: bool = False
    extracted: bool = False
    archive_kept: bool = True


def _installed_md5(task_dir: Path) -> str | None:
    """The MD5 of the archive ``task_dir`` was extracted from (its :data:`MARKER`), None if beseg did not make it."""
    return _read_json(task_dir / MARKER).get("md5") if (task_dir / MARKER).is_file() else None


def _check_target(task_dir: Path, md5: str) -> bool:
    """True when ``task_dir`` is in place from the archive with ``md5``; False when absent.

    Raises:
        DataError: something else is there (a folder beseg did not make, or one from another archive).
    """
    if not task_dir.exists() and not task_dir.is_symlink():
        return False
    installed = _installed_md5(task_dir)
    if installed is None:
        raise DataError(f"{task_dir} exists and was not made by `beseg data download` (no {MARKER} in it); to use "
                        "it as it is, give it to --data (check it with `beseg data check`); otherwise remove it or "
                        "download into another folder")
    if installed != md5:
        raise DataError(f"{task_dir} was extracted from an archive with MD5 {installed}, not the requested {md5}; "
                        "remove it or download into another folder")
    return True


def install_task(task: str, task_dir: str | Path, *, url: str | None = None, md5: str | None = None,
                 source: str | Path | None = None, keep_archive: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 retries: int = 5, retry_wait_s: float = 2.0, timeout_s: float = 60.0) -> InstallResult:
    """Put MSD ``task``'s folder at ``task_dir``: download (or take ``source``), verify, extract safely.

    The archive is downloaded beside the folder (``task_dir.parent / Task09_Spleen.tar``). Nothing is
    done when ``task_dir`` is in place already from the same archive. The data check is the
    caller's (``beseg data download`` runs ``beseg data check``; ``beseg reproduce`` checks before training).

    Args:
        task: ``task01`` or ``task09``.
        task_dir: the task folder to create (its name may differ from the archive's folder).
        url: the archive's URL; default :func:`archive_url` (``$BESEG_MSD_MIRROR`` or the public mirror).
        md5: the expected MD5; default the task's (:data:`MSD_ARCHIVES`).
        source: a local copy of the archive (no network): verified and extracted, never moved or changed.
        keep_archive: keep a downloaded archive after a successful extraction (default: remove it,
            since the folder holds the same data; a ``source`` is always kept).
        progress: tqdm bars for the download, the MD5 of a local copy and the extraction.
        log: receives the licence, where things go, and notes.
        max_member_bytes: the largest member extracted (see :func:`safe_extract`).
        retries, retry_wait_s, timeout_s: see :func:`download_archive`.

    Returns:
        An :class:`InstallResult`.

    Raises:
        ConfigError: unknown task, a bad MD5, or both ``url`` and ``source``.
        DataError: one line naming the URL or path (see :func:`download_archive`,
            :func:`safe_extract`), a target folder beseg did not make, an archive without
            ``<Folder>/dataset.json``, or another process working on the same folder.
    """
    spec = _archive(task)
    md5 = _check_md5(md5) if md5 else spec.md5
    if url and source:
        raise ConfigError("give either --url or --from, not both.")
    task_dir = Path(task_dir).expanduser().absolute()
    if _check_target(task_dir, md5):
        return InstallResult(task_dir)
    root = task_dir.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the folder {root}: {err.strerror or err}") from None
    log(f"MSD {spec.folder}: {MSD_LICENCE}.")
    with _Lock(root / f".{task_dir.name}.lock", str(task_dir), log) as lock:
        if _check_target(task_dir, md5):  # another process finished it between our first look and the lock
            return InstallResult(task_dir)
        for stale in root.glob(f".{task_dir.name}.extract-*"):  # an extraction that was killed: we hold the lock
            log(f"note: removing {stale}, left by an interrupted extraction")
            shutil.rmtree(stale, ignore_errors=True)
        result = InstallResult(task_dir)
        if source is not None:
            archive = _local_copy(Path(source).expanduser().absolute(), md5, progress, log, lock.beat)
            origin = str(archive)
        else:
            origin = url or archive_url(task)
            archive = root / spec.filename
            if not _verified_copy(archive, md5, progress, log, lock.beat):
                about = f" (about {spec.size_gb:g} GB)" if origin == archive_url(task) else ""
                log(f"downloading {origin}{about} to {archive}")
                download_archive(origin, archive, md5, progress=progress, retries=retries, retry_wait_s=retry_wait_s,
                                 timeout_s=timeout_s, log=log, beat=lock.beat, room_to_unpack=True)
                result.downloaded = True
        result.archive = archive
        log(f"unpacking {archive} into {task_dir}")
        _extract_into_place(archive, spec, task_dir, md5, origin, max_member_bytes, progress, lock.beat)
        result.extracted = True
        if source is None and not keep_archive:
            archive.unlink(missing_ok=True)
            _verified_meta(archive).unlink(missing_ok=True)
            result.archive_kept = False
    return result


def _local_copy(archive: Path, md5: str, progress: bool, log: Callable[[str], None],
                beat: Callable[[], None]) -> Path:
    """``--from``: the user's archive, if its MD5 matches; it is never renamed or changed (it is theirs).

    Raises:
        DataError: no such file, or another MD5.
    """
    if not archive.is_file():
        raise DataError(f"--from {archive}: no such file")
    log(f"checking the MD5 of {archive}")
    actual = _md5_of(archive, beat, progress).hexdigest()
    if actual != md5:
        raise DataError(f"{archive}: MD5 {actual} does not match the expected {md5}; nothing was extracted (the file "
                        "is left as it is)")
    return archive


def _verified_copy(archive: Path, md5: str, progress: bool, log: Callable[[str], None],
                   beat: Callable[[], None]) -> bool:
    """True when ``archive`` (where a download goes) is there with ``md5``, checking a file not verified yet.

    Raises:
        DataError: a file is there with another MD5: renamed aside, so that the next call downloads.
    """
    if _already_verified(archive, md5):
        return True
    if not archive.exists():
        return False
    log(f"checking the MD5 of {archive}")  # copied there by hand, or changed since it was verified
    if _md5_of(archive, beat, progress).hexdigest() == md5:
        _remember_verified(archive, md5)
        return True
    aside = _aside(archive, ".md5-mismatch")
    os.replace(archive, aside)
    raise DataError(f"{archive}: MD5 does not match the expected {md5}; nothing was extracted, and the file is kept "
                    f"aside as {aside}; run the same command again to download it")


def _extract_into_place(archive: Path, spec: MSDArchive, task_dir: Path, md5: str, origin: str,
                        max_member_bytes: int, progress: bool, beat: Callable[[], None]) -> None:
    """Unpack ``archive`` into a hidden folder beside ``task_dir``, then rename its task folder into place."""
    import tempfile

    root = task_dir.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{task_dir.name}.extract-", dir=root))
    try:
        try:
            safe_extract(archive, tmp, max_member_bytes=max_member_bytes, progress=progress, beat=beat)
        except OSError as err:
            raise _write_error(Path(err.filename) if err.filename else tmp, err,
                               f"nothing was put in place at {task_dir}") from None
        inner = tmp / spec.folder
        if not (inner / "dataset.json").is_file():
            top = sorted(p.name for p in tmp.iterdir())
            raise DataError(f"{archive}: no {spec.folder}/dataset.json inside (top level: "
                            f"{', '.join(top) or 'empty'}); is it the MSD {spec.folder} archive?")
        marker = {"task": spec.task, "archive": archive.name, "md5": md5, "source": origin,
                  "extracted": datetime.now(timezone.utc).isoformat(timespec="seconds"), "licence": "CC-BY-SA 4.0"}
        atomic_write_text(inner / MARKER, json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(inner, task_dir)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise DataError(f"{task_dir} appeared while unpacking; nothing was changed there") from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _version() -> str:
    """beseg's installed version, for the User-Agent (read from the package metadata: the data layer does not
    import the top-level package, which pulls in the loss library)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("beseg")
    except PackageNotFoundError:
        return "unknown"
