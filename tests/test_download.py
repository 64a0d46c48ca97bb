"""Tests of beseg.data.download (``beseg data download``, ``beseg reproduce --download``) against a real HTTP
server on the loopback interface, serving an MSD-layout tar made from the phantom."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from beseg.cli import main
from beseg.data import check_task, load_task, make_phantom
from beseg.data.download import (
    MARKER, MSD_ARCHIVES, archive_url, data_root, download_archive, install_task, safe_extract,
)
from beseg.errors import DataError
from beseg.fileio import process_identity, process_start_time

from conftest import TINY_COMPARE, tree_state

FOLDER = MSD_ARCHIVES["task09"].folder  # Task09_Spleen


# ----------------------------------------------------------------------------------------------
# a loopback HTTP server with Range support, and an MSD-layout archive


class ArchiveServer:
    """``http.server`` on 127.0.0.1 serving byte strings at paths, with ``Range`` (206, 416), in a thread.

    Attributes:
        requests: ``(path, headers)`` of every GET, in order.
        cut_after: close the connection after this many body bytes of the next response (once).
        ignore_range: answer every request with ``200`` and the whole file.
        no_length: send no ``Content-Length`` (the body ends when the connection closes).
    """

    def __init__(self, files: dict[str, bytes], port: int = 0) -> None:
        self.files, self.requests = files, []
        self.cut_after: int | None = None
        self.ignore_range = self.no_length = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet; the requests are recorded instead
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match and not server.ignore_range:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                if not server.no_length:
                    self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
                self.end_headers()
                data = body[start:]
                if server.cut_after is not None:
                    data, server.cut_after = data[: server.cut_after], None
                    self.wfile.write(data)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (a full disk, a refusal): as a real server, carry on

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def gets(self, path: str) -> list[dict]:
        """The headers of every GET of ``path``."""
        return [headers for p, headers in self.requests if p == path]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
    return info, data


def _entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime, info.mode = kind, linkname, 1_700_000_000, 0o755
    return info, None


def msd_members(folder: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The members of an archive laid out like MSD's ``Task09_Spleen.tar``, from a phantom task folder:
    ``Task09_Spleen/{dataset.json, imagesTr, labelsTr, imagesTs}``, the dataset named like the real one,
    and macOS ``._`` files beside the images as in the real archives."""
    meta = json.loads((folder / "dataset.json").read_text())
    meta.update(name="Spleen", description="Spleen Segmentation (beseg test archive from the phantom)")
    members = [_entry(FOLDER, tarfile.DIRTYPE), _file(f"{FOLDER}/dataset.json", json.dumps(meta).encode())]
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        members.append(_entry(f"{FOLDER}/{sub}", tarfile.DIRTYPE))
        for path in sorted((folder / sub).iterdir()):
            members.append(_file(f"{FOLDER}/{sub}/{path.name}", path.read_bytes()))
            if sub == "imagesTr":
                members.append(_file(f"{FOLDER}/{sub}/._{path.name}", b"\x00\x05\x16\x07 AppleDouble"))
    return members


@pytest.fixture(scope="module")
def msd_tar(tmp_path_factory) -> tuple[bytes, str]:
    """``(bytes, md5)`` of a Task09-like archive of 6 training and 1 test phantom cases of 32x32x12 voxels."""
    ph = make_phantom(tmp_path_factory.mktemp("msd") / "ph", cases=6, test_cases=1, size=(32, 32, 12),
                      progress=False)
    data = _tar(msd_members(ph))
    return data, hashlib.md5(data).hexdigest()


@pytest.fixture
def server(msd_tar):
    srv = ArchiveServer({"/msd/Task09_Spleen.tar": msd_tar[0]})
    yield srv
    srv.stop()


PATH = "/msd/Task09_Spleen.tar"


@pytest.fixture(autouse=True)
def _no_real_mirror(monkeypatch, tmp_path):
    """Nothing may reach the public mirror or the user's folders: the mirror points at a closed port."""
    monkeypatch.setenv("BESEG_MSD_MIRROR", "http://127.0.0.1:9/nowhere")
    monkeypatch.setenv("BESEG_DATA_DIR", str(tmp_path / "data-root"))
    monkeypatch.setenv("BESEG_CACHE", str(tmp_path / "cache"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("beseg data: error: ") or err.startswith("beseg reproduce: error: "), err
    return err


# ----------------------------------------------------------------------------------------------
# the archive table is MONAI's


def test_urls_and_md5_sums_are_monais(monkeypatch):
    from monai.apps import DecathlonDataset

    monkeypatch.delenv("BESEG_MSD_MIRROR")
    for task, spec in MSD_ARCHIVES.items():
        assert DecathlonDataset.md5[spec.folder] == spec.md5
        assert archive_url(task) == DecathlonDataset.resource[spec.folder]
    assert MSD_ARCHIVES["task09"].md5 == "410d4a301da4e5b2f6f86ec3ddba524e"


def test_the_data_root_is_to_then_beseg_data_dir_then_the_cache(monkeypatch, tmp_path):
    assert data_root(tmp_path / "x") == tmp_path / "x"
    assert data_root() == tmp_path / "data-root"
    monkeypatch.delenv("BESEG_DATA_DIR")
    assert data_root() == tmp_path / "cache" / "msd"


# ----------------------------------------------------------------------------------------------
# download, verify, extract, check


def test_download_verifies_extracts_and_the_folder_passes_data_check(server, msd_tar, tmp_path, capsys):
    root = tmp_path / "root"
    argv = ["data", "download", "task09", "--to", str(root), "--url", server.url(PATH), "--md5", msd_tar[1],
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "CC-BY-SA 4.0" in out and "OK: no problems found" in out
    task_dir = root / FOLDER
    report = check_task(task_dir)
    assert report.ok and len(report.cases) == 6 and report.ignored == 6  # the ._ files are there and ignored
    assert json.loads((task_dir / MARKER).read_text())["md5"] == msd_tar[1]
    # The archive is removed once unpacked; no temporary folder, part file or lock is left.
    assert sorted(p.name for p in root.iterdir()) == [FOLDER]
    assert len(server.gets(PATH)) == 1

    # Again: nothing fetched, nothing unpacked again, and the check still runs.
    before = tree_state(root)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "in place already" in out and "OK: no problems found" in out
    assert len(server.gets(PATH)) == 1 and tree_state(root) == before


def test_training_does_not_check_a_downloaded_folder_again(server, msd_tar, tmp_path, monkeypatch, capsys):
    import beseg.data.check as check

    root = tmp_path / "root"
    assert main(["data", "download", "task09", "--to", str(root), "--url", server.url(PATH), "--md5", msd_tar[1],
                 "--no-progress"]) == 0

    def reads_every_voxel(*args, **kwargs):
        raise AssertionError("the full check ran again")

    monkeypatch.setattr(check, "_check_files", reads_every_voxel)
    monkeypatch.chdir(root)
    check.require_valid_task(load_task(FOLDER))  # the pass is found, also under another spelling of the folder
    (root / FOLDER / "dataset.json").touch()  # a changed file: checked again
    with pytest.raises(AssertionError, match="the full check ran again"):
        check.require_valid_task(load_task(root / FOLDER))


def test_a_verified_archive_is_not_fetched_again(server, msd_tar, tmp_path):
    root = tmp_path / "root"
    install_task("task09", root / FOLDER, url=server.url(PATH), md5=msd_tar[1], keep_archive=True, progress=False,
                 log=lambda s: None)
    shutil.rmtree(root / FOLDER)  # the folder is gone, the archive kept: unpack it again without a download
    result = install_task("task09", root / FOLDER, url=server.url(PATH), md5=msd_tar[1], progress=False,
                          log=lambda s: None)
    assert result.extracted and not result.downloaded and check_task(root / FOLDER).ok
    assert len(server.gets(PATH)) == 1


def test_an_archive_put_in_place_by_hand_is_checked_before_use(server, msd_tar, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "Task09_Spleen.tar").write_bytes(msd_tar[0])  # copied there by hand: used once its MD5 matches
    result = install_task("task09", root / FOLDER, url=server.url(PATH), md5=msd_tar[1], progress=False,
                          log=lambda s: None)
    assert result.extracted and not result.downloaded and server.gets(PATH) == []
    # A damaged one is put aside (nothing unpacked), so that the next call downloads afresh.
    other = root / "other"
    other.mkdir()
    (other / "Task09_Spleen.tar").write_bytes(msd_tar[0][:-1] + b"!")
    with pytest.raises(DataError, match=r"Task09_Spleen\.tar: MD5 does not match .* kept aside as .*md5-mismatch"):
        install_task("task09", other / FOLDER, url=server.url(PATH), md5=msd_tar[1], progress=False, log=lambda s: None)
    assert sorted(p.name for p in other.iterdir()) == ["Task09_Spleen.tar.md5-mismatch"]
    install_task("task09", other / FOLDER, url=server.url(PATH), md5=msd_tar[1], progress=False, log=lambda s: None)
    assert check_task(other / FOLDER).ok and len(server.gets(PATH)) == 1


def test_an_archive_of_another_task_or_a_folder_of_another_archive_is_refused(msd_tar, tmp_path):
    wrong = tmp_path / "wrong.tar"
    wrong.write_bytes(_tar([_entry("Task02_Heart", tarfile.DIRTYPE), _file("Task02_Heart/dataset.json", b"{}")]))
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"wrong\.tar: no Task09_Spleen/dataset\.json inside \(top level: "
                                        r"Task02_Heart\)"):
        install_task("task09", root / FOLDER, source=wrong, md5=hashlib.md5(wrong.read_bytes()).hexdigest(),
                     progress=False, log=lambda s: None)
    assert list(root.iterdir()) == []
    given = tmp_path / "given.tar"
    given.write_bytes(msd_tar[0])
    install_task("task09", root / FOLDER, source=given, md5=msd_tar[1], progress=False, log=lambda s: None)
    with pytest.raises(DataError, match=f"was extracted from an archive with MD5 {msd_tar[1]}, not the requested"):
        install_task("task09", root / FOLDER, source=wrong, md5=hashlib.md5(wrong.read_bytes()).hexdigest(),
                     progress=False, log=lambda s: None)


def test_a_cut_transfer_resumes_with_a_range_request_and_the_same_checksum(server, msd_tar, tmp_path):
    data, md5 = msd_tar
    half = len(data) // 2
    server.cut_after = half
    notes = []
    dest = download_archive(server.url(PATH), tmp_path / "a.tar", md5, progress=False, retry_wait_s=0,
                            log=notes.append)
    assert hashlib.md5(dest.read_bytes()).hexdigest() == md5 and dest.read_bytes() == data
    first, second = server.gets(PATH)
    assert "Range" not in first and second["Range"] == f"bytes={half}-"
    assert second["If-Range"] == "Mon, 01 Jan 2024 00:00:00 GMT"  # the file must not have changed in between
    assert any(f"resuming at byte {half}" in n for n in notes)


def test_an_interrupted_download_resumes_in_the_next_call(msd_tar, tmp_path):
    data, md5 = msd_tar
    srv = ArchiveServer({PATH: data})
    srv.cut_after = 1000

    def ctrl_c():
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            download_archive(srv.url(PATH), tmp_path / "a.tar", md5, progress=False, log=lambda s: None, beat=ctrl_c)
    finally:
        srv.stop()
    assert (tmp_path / "a.tar.part").stat().st_size == 1000 and not (tmp_path / "a.tar").exists()
    # The server is gone: one line that says the bytes so far are kept.
    with pytest.raises(DataError, match=r"could not download .*: .*refused; the 1000 bytes downloaded so far are "
                                        r"kept in .*a\.tar\.part: run the same command again to resume"):
        download_archive(srv.url(PATH), tmp_path / "a.tar", md5, progress=False, log=lambda s: None)
    srv = ArchiveServer({PATH: data}, port=srv.port)  # back, at the same URL
    try:
        dest = download_archive(srv.url(PATH), tmp_path / "a.tar", md5, progress=False, log=lambda s: None)
    finally:
        srv.stop()
    assert dest.read_bytes() == data and not (tmp_path / "a.tar.part").exists()
    assert [h.get("Range") for _, h in srv.requests] == ["bytes=1000-"]


def test_a_server_that_ignores_range_restarts_cleanly(server, msd_tar, tmp_path):
    data, md5 = msd_tar
    server.cut_after = 3000
    server.ignore_range = True  # the retry's answer is 200 with the whole file: appended, it would corrupt the archive
    notes = []
    dest = download_archive(server.url(PATH), tmp_path / "a.tar", md5, progress=False, retry_wait_s=0,
                            log=notes.append)
    assert dest.read_bytes() == data
    assert [h.get("Range") for h in server.gets(PATH)] == [None, "bytes=3000-"]
    assert any("does not resume downloads" in n for n in notes)


def test_a_wrong_checksum_extracts_nothing_in_one_line_and_keeps_the_file_aside(server, msd_tar, tmp_path, capsys):
    root = tmp_path / "root"
    wrong = "0" * 32
    assert main(["data", "download", "task09", "--to", str(root), "--url", server.url(PATH), "--md5", wrong,
                 "--no-progress"]) == 1
    err = _one_line_error(capsys)
    assert f"MD5 {msd_tar[1]} does not match the expected {wrong}" in err and server.url(PATH) in err
    aside = root / "Task09_Spleen.tar.md5-mismatch"
    assert f"kept aside as {aside}" in err
    assert aside.read_bytes() == msd_tar[0]
    assert sorted(p.name for p in root.iterdir()) == [aside.name]  # no task folder, no .tar, no temporary folder


def test_bad_md5_argument_is_one_line(tmp_path, capsys):
    assert main(["data", "download", "task09", "--to", str(tmp_path), "--md5", "xyz", "--no-progress"]) == 1
    assert "--md5 must be 32 hexadecimal digits" in _one_line_error(capsys)


# ----------------------------------------------------------------------------------------------
# safe extraction


UNSAFE = {
    "dotdot": lambda tmp: _file(f"{FOLDER}/../../escape.txt", b"escaped"),
    "absolute": lambda tmp: _file(str(tmp / "absolute-escape.txt"), b"escaped"),
    "symlink": lambda tmp: _entry(f"{FOLDER}/imagesTr/link", tarfile.SYMTYPE, "../../../outside"),
    "hardlink": lambda tmp: _entry(f"{FOLDER}/hard", tarfile.LNKTYPE, "/etc/passwd"),
    "device": lambda tmp: _entry(f"{FOLDER}/dev", tarfile.CHRTYPE),
    "oversized": None,  # a member one byte over the limit, which every good member is under
}


@pytest.mark.parametrize("use_filter", [True, False], ids=["data-filter", "own-checks-only"])
@pytest.mark.parametrize("kind", list(UNSAFE))
def test_unsafe_members_are_refused_naming_the_member_and_nothing_is_written(kind, use_filter, msd_tar, tmp_path,
                                                                             monkeypatch):
    if not use_filter:  # a Python without extraction filters: our checks alone must refuse
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    with tarfile.open(fileobj=io.BytesIO(msd_tar[0])) as good:
        members = [(m, good.extractfile(m).read() if m.isfile() else None) for m in good.getmembers()]
    limit = max(m.size for m, _ in members)
    bad = UNSAFE[kind](tmp_path / "top") if UNSAFE[kind] else _file(f"{FOLDER}/imagesTr/huge.nii.gz",
                                                                     b"x" * (limit + 1))
    members.insert(3, bad)  # after dataset.json: good members come before it too
    source = tmp_path / "top" / "given" / "Task09_Spleen.tar"
    source.parent.mkdir(parents=True)
    source.write_bytes(_tar(members))
    root = tmp_path / "top" / "a" / "root"
    root.mkdir(parents=True)
    before = tree_state(tmp_path)
    with pytest.raises(DataError) as err:
        install_task("task09", root / FOLDER, source=source, md5=hashlib.md5(source.read_bytes()).hexdigest(),
                     max_member_bytes=limit, progress=False, log=lambda s: None)
    assert f"refusing member {bad[0].name!r}" in str(err.value) and str(source) in str(err.value)
    assert tree_state(tmp_path) == before
    assert list(root.iterdir()) == [] and not (tmp_path / "top" / "absolute-escape.txt").exists()


@pytest.mark.parametrize("use_filter", [True, False], ids=["data-filter", "own-checks-only"])
def test_a_link_chain_that_leads_out_on_disk_is_refused(use_filter, tmp_path):
    """``a -> .`` then ``b -> a/..``: read lexically, ``a/..`` stays inside, but on disk ``b`` is the folder's
    parent. Our checks refuse any link with ``..``; the data filter, where present, resolves links on disk."""
    data = _tar([_entry("a", tarfile.SYMTYPE, "."), _entry("b", tarfile.SYMTYPE, "a/..")])
    archive = tmp_path / "chain.tar"
    archive.write_bytes(data)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError, match=r"chain\.tar: refusing member 'b': a symbolic link to 'a/\.\.', out of"):
        safe_extract(archive, dest, progress=False, use_filter=use_filter)
    assert list(dest.iterdir()) == []


def test_a_killed_extraction_leaves_no_task_folder_and_the_next_call_cleans_up(msd_tar, tmp_path, monkeypatch):
    source = tmp_path / "given.tar"
    source.write_bytes(msd_tar[0])
    root = tmp_path / "root"
    calls = {"n": 0}
    real = tarfile.TarFile.extract

    def dies_half_way(self, member, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # Ctrl-C half-way through
        return real(self, member, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        install_task("task09", root / FOLDER, source=source, md5=msd_tar[1], progress=False, log=lambda s: None)
    assert sorted(p.name for p in root.iterdir()) == []  # no half folder, no temporary folder, no lock
    monkeypatch.setattr(tarfile.TarFile, "extract", real)
    # A SIGKILL leaves the hidden temporary folder (with a dataset.json in it): never taken for the task.
    leftover = root / f".{FOLDER}.extract-killed" / FOLDER
    leftover.mkdir(parents=True)
    (leftover / "dataset.json").write_text("{}")
    notes = []
    result = install_task("task09", root / FOLDER, source=source, md5=msd_tar[1], progress=False, log=notes.append)
    assert result.extracted and check_task(root / FOLDER).ok
    assert sorted(p.name for p in root.iterdir()) == [FOLDER]
    assert any("left by an interrupted extraction" in n for n in notes)


# ----------------------------------------------------------------------------------------------
# --from a local copy, and errors


def test_from_a_local_copy_works_with_the_server_stopped(server, msd_tar, tmp_path, capsys):
    server.stop()
    given = tmp_path / "given" / "Task09_Spleen.tar"
    given.parent.mkdir()
    given.write_bytes(msd_tar[0])
    kept = tree_state(given.parent)
    root = tmp_path / "root"
    assert main(["data", "download", "task09", "--from", str(given), "--md5", msd_tar[1], "--to", str(root),
                 "--no-progress"]) == 0
    assert "OK: no problems found" in capsys.readouterr().out
    assert check_task(root / FOLDER).ok and tree_state(given.parent) == kept  # the user's file untouched
    # A copy with the wrong MD5 is left exactly as it is (it is the user's), and nothing is unpacked.
    assert main(["data", "download", "task09", "--from", str(given), "--md5", "1" * 32, "--to",
                 str(tmp_path / "other"), "--no-progress"]) == 1
    err = _one_line_error(capsys)
    assert str(given) in err and "does not match" in err and "left as it is" in err
    assert tree_state(given.parent) == kept and not (tmp_path / "other" / FOLDER).exists()


def test_beseg_msd_mirror_sets_the_mirror(server, msd_tar, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BESEG_MSD_MIRROR", server.url("/msd/"))
    assert main(["data", "download", "task09", "--md5", msd_tar[1], "--no-progress"]) == 0
    assert len(server.gets(PATH)) == 1
    assert check_task(tmp_path / "data-root" / FOLDER).ok  # BESEG_DATA_DIR


def test_errors_are_one_line_naming_the_url_or_path(server, msd_tar, tmp_path, capsys):
    missing = server.url("/msd/nothing.tar")
    assert main(["data", "download", "task09", "--to", str(tmp_path / "r1"), "--url", missing, "--no-progress"]) == 1
    err = _one_line_error(capsys)
    assert f"could not download {missing}: HTTP 404" in err

    refused = "http://127.0.0.1:9/Task09_Spleen.tar"  # the discard port: nothing listens
    assert main(["data", "download", "task09", "--to", str(tmp_path / "r2"), "--url", refused, "--no-progress"]) == 1
    err = _one_line_error(capsys)
    assert f"could not download {refused}:" in err and "refused" in err.lower()

    theirs = tmp_path / "r3" / FOLDER
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    assert main(["data", "download", "task09", "--to", str(tmp_path / "r3"), "--url", server.url(PATH), "--md5",
                 msd_tar[1], "--no-progress"]) == 1
    err = _one_line_error(capsys)
    assert f"{theirs} exists and was not made by `beseg data download`" in err
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"] and server.gets(PATH) == []

    assert main(["data", "download", "task09", "--from", str(tmp_path / "none.tar"), "--to", str(tmp_path / "r4"),
                 "--no-progress"]) == 1
    assert f"--from {tmp_path / 'none.tar'}: no such file" in _one_line_error(capsys)


def test_a_folder_being_downloaded_by_a_live_process_is_refused(server, msd_tar, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # the lock record a live downloader in another process holds
        record = {**process_identity(), "pid": holder.pid, "start": process_start_time(holder.pid), "token": "1" * 32,
                  "started": time.time(), "heartbeat": time.time()}
        (root / f".{FOLDER}.lock").write_text(json.dumps(record))
        assert main(["data", "download", "task09", "--to", str(root), "--url", server.url(PATH), "--md5",
                     msd_tar[1], "--no-progress"]) == 1
        assert f"is being downloaded or extracted by process {holder.pid}" in _one_line_error(capsys)
        assert server.gets(PATH) == []
    finally:
        holder.kill()
        holder.wait()
    # Its holder is gone: the lock is taken over.
    assert main(["data", "download", "task09", "--to", str(root), "--url", server.url(PATH), "--md5", msd_tar[1],
                 "--no-progress"]) == 0
    assert "taking over the lock" in capsys.readouterr().out


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB filesystem (tmpfs; needs root, as in CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to mount a tmpfs")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_partial_download(small_disk, tmp_path, capsys):
    big = os.urandom(3 * 1024 * 1024)
    srv = ArchiveServer({PATH: big})
    try:
        # With a Content-Length: refused before a byte is written.
        assert main(["data", "download", "task09", "--to", str(small_disk), "--url", srv.url(PATH), "--md5",
                     hashlib.md5(big).hexdigest(), "--no-progress"]) == 1
        err = _one_line_error(capsys)
        assert f"not enough free space in {small_disk} for Task09_Spleen.tar.part" in err
        assert not (small_disk / "Task09_Spleen.tar.part").exists() or \
            (small_disk / "Task09_Spleen.tar.part").stat().st_size == 0
        # Without one, the disk fills up: one line naming the file, and the bytes received are kept to resume.
        srv.no_length = True
        assert main(["data", "download", "task09", "--to", str(small_disk), "--url", srv.url(PATH), "--md5",
                     hashlib.md5(big).hexdigest(), "--no-progress"]) == 1
        err = _one_line_error(capsys)
        part = small_disk / "Task09_Spleen.tar.part"
        assert f"could not write {part}: No space left on device; the partial download is kept" in err
        assert 0 < part.stat().st_size <= 1024 * 1024 and big.startswith(part.read_bytes())
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------
# beseg reproduce --download


def test_reproduce_download_options_need_download(capsys):
    assert main(["reproduce", "--task", "task09", "--url", "http://127.0.0.1:9/x.tar", "--cpu-ok"]) == 1
    assert "--url and --md5 go with --download" in _one_line_error(capsys)
    assert main(["reproduce", "--task", "task09", "--cpu-ok"]) == 1
    assert "Or --download to fetch it" in _one_line_error(capsys)


@pytest.mark.slow
def test_reproduce_download_goes_from_nothing_to_a_report_and_a_second_call_does_nothing_more(server, msd_tar,
                                                                                              tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["reproduce", "--task", "task09", "--download", "--url", server.url(PATH), "--md5", msd_tar[1],
            "--cpu-ok", "--systems", "segresnet_dice,segresnet_be", "--seeds", "1", "--out", str(out),
            "--no-progress", *TINY_COMPARE, f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    task_dir = tmp_path / "data-root" / FOLDER  # BESEG_DATA_DIR
    assert "CC-BY-SA 4.0" in text and f"data: {task_dir}" in text
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.html").is_file()
    assert check_task(task_dir).ok and len(server.gets(PATH)) == 1
    trained = tree_state(*(out / s / "seed0" / "checkpoints" for s in ("segresnet_dice", "segresnet_be")))
    assert len(trained) >= 4

    assert main(argv) == 0
    text = capsys.readouterr().out
    assert len(server.gets(PATH)) == 1  # nothing downloaded
    assert text.count("skipped") == 2 and "CC-BY-SA" not in text  # nothing trained, nothing unpacked
    assert tree_state(*(out / s / "seed0" / "checkpoints" for s in ("segresnet_dice", "segresnet_be"))) == trained
