"""The preprocessed store (beseg.data.store) and the datasets that read it (beseg.data.patches)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset
from monai.metrics import compute_dice
from monai.transforms import CastToTyped, Compose

from beseg.cli import main
from beseg.data import build_task_data, foreground_percentiles, get_preset, load_task, make_phantom, msd_brats_regions
from beseg.data.classes import class_masks
from beseg.data.patches import StorePatchDataset, StoreVolumeDataset, crop_start, read_region
from beseg.data.store import Store, open_store, prepare_store, sample_locations
from beseg.engine.inference import predict_probabilities
from beseg.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SMALL = {"cases": 4, "test_cases": 0, "size": (40, 40, 12)}


@pytest.fixture(scope="module")
def spleen(tmp_path_factory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("p") / "spleen", task="spleen", progress=False, **SMALL)


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("p") / "brain", task="brain", progress=False, **SMALL)


def builds(store: Store) -> list[str]:
    """Case ids in the store's build log, one per build."""
    log = store.root / "builds.log"
    return [line.split("\t")[0] for line in log.read_text().splitlines()] if log.exists() else []


# ---- building --------------------------------------------------------------------------------

def test_store_holds_float32_images_uint8_labels_and_locations(brain, tmp_path):
    task = load_task(brain)
    store = prepare_store(task, get_preset("phantom-brain"), tmp_path / "cache")
    case = task.training[0]
    arrays = store.open(case.id)
    assert isinstance(arrays.image, np.memmap) and isinstance(arrays.label, np.memmap)
    assert arrays.image.dtype == np.float32 and arrays.label.dtype == np.uint8
    props = arrays.properties
    # Task01-like z-score: cropped to the non-zero box, which the whole 1 mm grid contains
    assert arrays.image.shape[0] == 4 and list(arrays.image.shape[1:]) == [b - a for a, b in props["bbox"]]
    assert np.prod(arrays.image.shape[1:]) < np.prod(props["shape"])
    assert props["original_shape"] == [40, 40, 12] and props["original_spacing"] == pytest.approx([0.8, 0.8, 2.5])
    # locations: label values with the value stored at each location
    label = np.asarray(arrays.label[0])
    values, x, y, z = arrays.locations.T
    np.testing.assert_array_equal(label[x, y, z], values)
    assert set(values.tolist()) == {0, 1, 2, 3}
    assert {k: v for k, v in props["label_counts"].items()} == {
        str(v): int((label == v).sum()) for v in range(4)}
    # the crop loses nothing: padding it back gives exactly the validation chain's volume
    image, full_label = store.volume(case.id)
    val = get_preset("phantom-brain").val_transforms()(case.as_dict())
    np.testing.assert_array_equal(image, np.asarray(val["image"]))
    np.testing.assert_array_equal(full_label, np.asarray(val["label"]))


def test_task09_store_is_uncropped_raw_intensities_and_split_independent(spleen, tmp_path):
    task = load_task(spleen)
    preset = get_preset("phantom-spleen")
    store = prepare_store(task, preset, tmp_path / "cache")
    case = task.training[0]
    props = store.properties(case)
    assert props["bbox"] == [[0, n] for n in props["shape"]]  # percentile scaling maps 0 elsewhere: no crop
    image, _ = store.volume(case.id)
    stats = foreground_percentiles(task.training[:2], None)
    val = preset.val_transforms(stats)(case.as_dict())
    # the store holds the resampled intensities, scaled at reading time with the run's statistics
    np.testing.assert_array_equal(np.asarray(preset.read_transform(stats)(torch.from_numpy(image))),
                                  np.asarray(val["image"]))


def test_sample_locations_are_seeded_capped_and_cover_every_value():
    label = np.zeros((30, 30, 30), np.uint8)
    label[5:10, 5:10, 5:10] = 1
    label[20, 20, 20] = 2
    loc, counts = sample_locations(label, 50, seed=3)
    assert counts == {"0": 30**3 - 126, "1": 125, "2": 1}
    per_value = {v: int((loc[:, 0] == v).sum()) for v in (0, 1, 2)}
    assert per_value == {0: 50, 1: 50, 2: 1}
    np.testing.assert_array_equal(label[tuple(loc[:, 1:].T)], loc[:, 0])
    assert len({tuple(r) for r in loc.tolist()}) == len(loc)  # without replacement
    np.testing.assert_array_equal(sample_locations(label, 50, seed=3)[0], loc)


def test_a_store_from_other_settings_is_not_reused(spleen, tmp_path):
    task = load_task(spleen)
    preset = get_preset("phantom-spleen")
    first = prepare_store(task, preset, tmp_path / "cache")
    other = prepare_store(task, preset, tmp_path / "cache", locations=100)  # other settings: another folder
    assert other.root != first.root and len(builds(other)) == len(task.training)
    # a folder whose settings file disagrees with its name is refused, never read
    record = first.root / "settings.json"
    settings = json.loads(record.read_text())
    record.write_text(json.dumps({**settings, "crop": not settings["crop"]}))
    with pytest.raises(DataError, match="other preprocessing settings.*never reused"):
        open_store(task, preset, tmp_path / "cache")
    # a case manifest from other settings is not current either
    record.write_text(json.dumps(settings))
    case = task.training[0]
    manifest = first.path(case.id, "json")
    manifest.write_text(manifest.read_text().replace(first.settings.digest, "0" * 12))
    assert not first.ready(case)


def test_a_truncated_case_file_is_detected_and_rebuilt(spleen, tmp_path):
    task = load_task(spleen)
    preset = get_preset("phantom-spleen")
    store = prepare_store(task, preset, tmp_path / "cache")
    case = task.training[1]
    path = store.path(case.id, "image")
    good = np.load(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    assert not store.ready(case)
    with pytest.raises(DataError, match="not complete in the store"):
        store.properties(case)
    prepare_store(task, preset, tmp_path / "cache")
    assert builds(store).count(case.id) == 2 and builds(store).count(task.training[0].id) == 1
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), good)
    # a changed source file (another size) rebuilds its case too
    case.label.write_bytes(case.label.read_bytes() + b"\0" * 16)
    assert not store.ready(case)


STALL_MID_WRITE = textwrap.dedent("""
    import sys, time
    import numpy
    from beseg.data import get_preset, load_task
    from beseg.data.store import open_store
    root, cache, case_id = sys.argv[1:4]
    save = numpy.save
    def stalling_save(f, *args, **kwargs):  # killed between writing an array and renaming it
        save(f, *args, **kwargs)
        f.flush()
        print("building", flush=True)
        time.sleep(600)
    numpy.save = stalling_save
    task = load_task(root)
    open_store(task, get_preset("phantom-spleen"), cache).ensure(task.case(case_id))
""")


def _stall_before_build(store: Store, case, ready) -> None:
    def build_case(case, lock=None):
        ready.put("building")
        time.sleep(600)

    store.build_case = build_case  # (in the forked builder only)
    store.ensure(case)


def hold_case_lock(store: Store, case, where: str = "before-build"):
    """A real builder of ``case`` holding its lock: stalled before building (a forked process, quick to start), or
    between writing an array to its temporary file and renaming it (a fresh interpreter). Returns the process
    (``.pid``, ``.kill()``)."""
    if where == "mid-write":
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        task_root = Path(case.image).parent.parent
        proc = subprocess.Popen([sys.executable, "-c", STALL_MID_WRITE, str(task_root), str(store.root.parent),
                                 case.id], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "building"
        return proc
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Queue()
    proc = ctx.Process(target=_stall_before_build, args=(store, case, ready), daemon=True)
    proc.start()
    assert ready.get(timeout=60) == "building"
    return proc


def end(proc) -> None:
    """SIGCONT (if stopped), then SIGKILL, and reap it (a zombie's pid would still exist)."""
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait() if isinstance(proc, subprocess.Popen) else proc.join()


def ensure_in_thread(store: Store, case, **kwargs) -> tuple[threading.Thread, list]:
    done: list = []
    waiter = threading.Thread(target=lambda: done.append(store.ensure(case, poll_s=0.05, **kwargs)), daemon=True)
    waiter.start()
    return waiter, done


def ensure_within(store: Store, case, seconds: float, hung: str) -> list[str]:
    """``store.ensure(case)`` must build the case (once) within ``seconds``; returns the warnings it gave."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        waiter, done = ensure_in_thread(store, case)
        waiter.join(seconds)
    assert not waiter.is_alive(), hung
    assert done == [True] and builds(store) == [case.id]
    return [str(w.message) for w in said]


def test_a_dead_builders_lock_is_taken_over(spleen, tmp_path):
    task = load_task(spleen)
    store = open_store(task, get_preset("phantom-spleen"), tmp_path / "cache")
    case = task.training[0]
    builder = hold_case_lock(store, case)
    end(builder)  # SIGKILL: its lock stays
    assert store.path(case.id, "lock").exists()
    with pytest.warns(RuntimeWarning, match=f"process {builder.pid} on {socket.gethostname()} no longer exists"):
        assert store.ensure(case) and store.ready(case)
    assert builds(store) == [case.id]
    assert not list(store.root.glob(f"{case.id}.lock*"))


def test_a_live_builders_lock_is_waited_for_not_built_over(spleen, tmp_path, capfd):
    task = load_task(spleen)
    store = open_store(task, get_preset("phantom-spleen"), tmp_path / "cache")
    case = task.training[0]
    holder = hold_case_lock(store, case)
    try:
        waiter, done = ensure_in_thread(store, case)
        waiter.join(1.0)
        assert waiter.is_alive() and not store.ready(case) and builds(store) == []  # waits, builds nothing
        # and says once whom it waits for
        assert capfd.readouterr().err.count(f"store: waiting for case {case.id}, which process {holder.pid} on "
                                            f"{socket.gethostname()} is building") == 1
    finally:
        end(holder)
    waiter.join(30)  # the holder died without finishing: its lock is taken over and the case built once
    assert done == [True] and store.ready(case) and builds(store) == [case.id]


def test_a_builders_lock_whose_pid_now_names_another_live_process_is_taken_over(spleen, tmp_path):
    """Fix 5: after a container restart the dead builder's pid belongs to a live process; the record's start
    time tells them apart, so the lock is taken over with a message, not waited for forever."""
    task = load_task(spleen)
    store = open_store(task, get_preset("phantom-spleen"), tmp_path / "cache")
    case = task.training[0]
    builder = hold_case_lock(store, case)
    end(builder)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = store.path(case.id, "lock")
        text = lock.read_text()
        lock.write_text(re.sub(rf'("pid": ){builder.pid}\b|^{builder.pid}(?= )', lambda m: (m.group(1) or "")
                               + str(sleeper.pid), text))
        assert str(sleeper.pid) in lock.read_text()
        said = ensure_within(store, case, 60, "waited for a lock of a process that no longer exists")
        assert any(f"pid {sleeper.pid} now belongs to another process" in text for text in said), said
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_hung_builders_lock_whose_heartbeat_is_an_hour_old_is_taken_over(spleen, tmp_path):
    """Fix 5: a builder on this host that is alive but has not refreshed its lock for an hour (hung, stopped) is
    judged by its heartbeat like any other; the pid check alone kept its lock forever."""
    task = load_task(spleen)
    store = open_store(task, get_preset("phantom-spleen"), tmp_path / "cache")
    case = task.training[0]
    builder = hold_case_lock(store, case)
    try:
        os.kill(builder.pid, signal.SIGSTOP)
        hour_ago = time.time() - 3600
        for path in store.root.glob(f"{case.id}.lock*"):
            os.utime(path, (hour_ago, hour_ago))
        said = ensure_within(store, case, 60, "waited for a lock that has not been refreshed for an hour")
        assert any(re.search(rf"process {builder.pid} .*heartbeat has not changed for 3\d\d\d s", text)
                   for text in said), said
    finally:
        end(builder)


def test_an_empty_lock_file_is_not_stale_after_a_second(spleen, tmp_path, monkeypatch):
    """Suspicion (confirmed on 1580cec): an empty lock file (on NFS a reader may see a just-created lock empty for
    a while) counted as stale after 1 s, so a second process built the case too. It counts as stale only once it
    has been seen unchanged for the stale limit."""
    monkeypatch.setenv("BESEG_STORE_LOCK_STALE_S", "4")
    monkeypatch.setenv("BESEG_STORE_LOCK_HEARTBEAT_S", "1")
    monkeypatch.setenv("BESEG_LOCK_SKEW_S", "0")
    task = load_task(spleen)
    store = open_store(task, get_preset("phantom-spleen"), tmp_path / "cache")
    case = task.training[0]
    lock = store.path(case.id, "lock")
    lock.touch()
    time.sleep(1.2)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        waiter, done = ensure_in_thread(store, case)
        waiter.join(1.5)
        assert waiter.is_alive() and builds(store) == []  # 2.7 s old: still somebody's lock
        waiter.join(30)
    assert done == [True] and builds(store) == [case.id]  # unchanged for the limit: taken over, built once
    assert any("is unreadable and has not changed for" in str(w.message) for w in said)


@pytest.mark.slow
def test_a_killed_builders_temporary_files_are_removed_by_the_next_builder(spleen, tmp_path):
    """Suspicion (confirmed on 1580cec): a builder killed between writing and renaming leaves .<case>.*.tmp files
    (up to a whole resampled case) that nothing removed."""
    task = load_task(spleen)
    store = open_store(task, get_preset("phantom-spleen"), tmp_path / "cache")
    case = task.training[0]
    builder = hold_case_lock(store, case, where="mid-write")
    end(builder)
    left = list(store.root.glob(f".{case.id}.*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size > 0  # the killed builder's half-stored array
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert store.ensure(case)
    assert not list(store.root.glob(".*.tmp")) and store.ready(case)


def _with_uncompressed_label(src: Path, dst: Path, case_index: int = 0) -> Path:
    """A copy of the task whose case ``case_index`` has an uncompressed ``.nii`` label (an in-place edit keeps
    its size)."""
    import nibabel as nib
    import shutil

    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    entry = meta["training"][case_index]
    gz = dst / entry["label"]
    nii = gz.with_name(gz.name.removesuffix(".gz"))
    nib.save(nib.load(str(gz)), str(nii))
    gz.unlink()
    entry["label"] = entry["label"].removesuffix(".gz")
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    return nii


def _edit_label_in_place(path: Path) -> int:
    """Erase every foreground voxel of an uncompressed label, writing over its bytes (size unchanged); returns
    the voxels erased."""
    import nibabel as nib

    image = nib.load(str(path))
    offset = int(image.dataobj.offset)
    data = np.asarray(image.dataobj).copy()  # a copy: the proxy of an uncompressed file maps the bytes rewritten below
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.zeros_like(data).tobytes(order="F"))
    return int((data != 0).sum())


def _stored_with_uncompressed_label(spleen: Path, tmp_path: Path):
    """A task whose first case has an uncompressed label, and its store: ``(task, preset, store, label)``."""
    label = _with_uncompressed_label(spleen, tmp_path / "data")
    task = load_task(tmp_path / "data")
    preset = get_preset("phantom-spleen")
    return task, preset, prepare_store(task, preset, tmp_path / "cache"), label


def test_an_in_place_edit_that_keeps_a_labels_size_rebuilds_its_case(spleen, tmp_path):
    """Fix 6: the store checked only source sizes, so a corrected label in an uncompressed .nii (same size) left
    the old label in the store for training and evaluation."""
    task, preset, store, label = _stored_with_uncompressed_label(spleen, tmp_path)
    case = task.training[0]
    assert int(np.asarray(store.open(case.id).label).sum()) > 0
    size = label.stat().st_size
    assert _edit_label_in_place(label) > 0 and label.stat().st_size == size
    assert not store.ready(case)
    assert store.state(case)[1] == f"source label {label} changed content (SHA-256) since it was stored"
    prepare_store(task, preset, tmp_path / "cache")
    assert builds(store).count(case.id) == 2 and builds(store).count(task.training[1].id) == 1
    assert int(np.asarray(store.open(case.id).label).sum()) == 0  # the corrected label is what training reads


def test_content_decides_where_it_is_hashed_and_the_modification_time_elsewhere(spleen, tmp_path, monkeypatch):
    task, preset, store, label = _stored_with_uncompressed_label(spleen, tmp_path)
    case = task.training[0]
    stat = label.stat()
    # an edit that restores the modification time (cp -p, rsync -t of an edited copy): the hash sees it
    _edit_label_in_place(label)
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not store.ready(case)
    prepare_store(task, preset, tmp_path / "cache")
    # a new modification time with the same content (a copy, a touch): still current, nothing rebuilt
    os.utime(label)
    assert store.ready(case)
    # files above the hash limit are compared by modification time
    monkeypatch.setenv("BESEG_STORE_HASH_MB", "0")
    unhashed = open_store(task, preset, tmp_path / "cache")
    assert not unhashed.ready(case) and unhashed.state(case)[1].endswith("was modified since it was stored")
    assert unhashed.ready(task.training[1])


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_data_check_store_lists_stale_orphaned_and_leftover_files_and_fix_removes_them(spleen, tmp_path, capsys):
    data = tmp_path / "data"
    label = _with_uncompressed_label(spleen, data)
    config = ["--config", "phantom_spleen_segresnet_be", f"data.cache_dir={tmp_path / 'cache'}"]
    assert _cli(capsys, "data", "check", data, "--store", *config)[1].strip().endswith("not prepared yet (nothing to check)")
    assert not (tmp_path / "cache").exists()  # checking creates nothing
    assert _cli(capsys, "data", "prepare", data, *config, "--no-progress")[0] == 0
    task = load_task(data)
    store = open_store(task, get_preset("phantom-spleen"), tmp_path / "cache")
    code, out, _ = _cli(capsys, "data", "check", data, "--store", *config)
    assert code == 0 and "4 current, 0 not built, 0 stale, 0 orphaned case(s); 0 leftover file(s), 0 stale lock(s)" in out

    _edit_label_in_place(label)  # stale: its label changed
    stale = task.training[0].id
    for what in ("image", "label", "locations", "json"):  # orphaned: a case the dataset no longer lists
        (store.root / f"gone_case{store.path('x', what).name[1:]}").write_bytes(b"x")
    leftover = store.root / f".{task.training[1].id}.image.npy.k1ll3d.tmp"  # a killed builder's
    leftover.write_bytes(b"\0" * 1000)
    store.path(task.training[2].id, "json").unlink()  # being rebuilt...
    dead = hold_case_lock(store, task.training[2])
    end(dead)  # ... by a builder that was killed: its lock is left
    code, out, _ = _cli(capsys, "data", "check", data, "--store", *config)
    assert code == 1
    assert f"stale: case {stale}: source label {label} changed content (SHA-256) since it was stored" in out
    assert "orphaned: case gone_case is not in the dataset (4 file(s): gone_case.image.npy" in out
    assert f"leftover: {leftover} (0.0 MB)" in out
    assert f"stale lock: case {task.training[2].id}: process {dead.pid} on {socket.gethostname()} no longer exists" in out
    assert "2 current, 1 not built, 1 stale, 1 orphaned case(s); 1 leftover file(s), 1 stale lock(s)" in out
    assert "run again with --fix" in out

    code, out, _ = _cli(capsys, "data", "check", data, "--store", *config, "--fix")
    assert code == 0, out
    assert "now: store" in out and "2 current, 2 not built, 0 stale, 0 orphaned case(s); 0 leftover file(s), 0 stale lock(s)" in out
    assert not list(store.root.glob("gone_case*")) and not leftover.exists()
    assert not list(store.root.glob("*.lock*")) and not store.path(stale, "image").exists()
    assert store.ready(task.training[1]) and store.ready(task.training[3])  # current cases kept
    # wrong use is one line
    assert "only apply with --store" in _cli(capsys, "data", "check", data, "--fix")[2]
    assert "--store needs --config" in _cli(capsys, "data", "check", data, "--store")[2]


BUILD_AND_READ = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from beseg.data import get_preset, load_task
    from beseg.data.patches import StorePatchDataset
    from beseg.data.store import prepare_store
    root, cache, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.005)
    task = load_task(root)
    preset = get_preset("phantom-spleen")
    store = prepare_store(task, preset, cache)
    from beseg.data import foreground_percentiles
    ds = StorePatchDataset(store, [c.id for c in task.training], (16, 16, 16),
                           preset.read_transform(foreground_percentiles(task.training, None)), preset.training_target)
    patches = [ds.sample(i, i)[0] for i in range(len(ds))]
    assert all(p["image"].shape == (1, 16, 16, 16) for p in patches)
    print("read", len(patches))
""")


@pytest.mark.slow
def test_two_processes_building_one_store_build_each_case_once_and_both_read(spleen, tmp_path):
    go = tmp_path / "go"
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_AND_READ, str(spleen), str(tmp_path / "cache"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    import time

    time.sleep(2.0)  # both imported and waiting
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == "read 4"
    store = open_store(load_task(spleen), get_preset("phantom-spleen"), tmp_path / "cache")
    assert sorted(builds(store)) == sorted(c.id for c in load_task(spleen).training)  # each case once
    assert not list(store.root.glob("*.lock")) and not list(store.root.glob(".*tmp"))


# ---- reading -----------------------------------------------------------------------------------

def test_crop_start_keeps_the_patch_inside_the_padded_volume():
    assert crop_start((0, 50, 99), (100, 100, 100), (20, 20, 20)) == (0, 40, 80)
    # a volume smaller than the patch is padded symmetrically: (20 - 8) // 2 = 6 voxels before it
    assert crop_start((4, 4, 4), (8, 8, 30), (20, 20, 20)) == (-6, -6, 0)


@pytest.mark.parametrize("start,flip", [((-2, 1, 3), (True, False, True)), ((0, 0, 0), (False, True, False)),
                                        ((1, -1, 2), (True, True, True)), ((0, 1, 0), (False, False, False))])
def test_read_region_is_pad_crop_flip_in_one_copy(start, flip):
    array = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    out = read_region(array, start, (6, 4, 6), flip=flip)
    padded = np.zeros((2, 13, 14, 15), np.float32)  # zero padding of 4 on every side, then crop, then flip
    padded[:, 4:9, 4:10, 4:11] = array
    expected = padded[:, start[0] + 4:start[0] + 10, start[1] + 4:start[1] + 8, start[2] + 4:start[2] + 10]
    expected = np.flip(expected, tuple(i + 1 for i, f in enumerate(flip) if f))
    np.testing.assert_array_equal(out, expected)
    assert out.flags.writeable and out.flags.c_contiguous and not np.shares_memory(out, array)


def test_brats_training_target_is_the_msd_regions_as_float32():
    label = np.random.default_rng(0).integers(0, 4, (1, 9, 9, 9)).astype(np.uint8)
    target = get_preset("task01").training_target(label)
    assert target.dtype == np.float32
    np.testing.assert_array_equal(target, msd_brats_regions(label).astype(np.float32))


def test_patch_sampling_gives_the_foreground_share_of_randcropbyposneglabeld(tmp_path):
    # 1 mm phantom of 64x64x40 voxels: the spleen fills a minority of it, so the share of foreground in a
    # patch depends on how the centres are drawn.
    root = make_phantom(tmp_path / "sp", task="spleen", cases=2, test_cases=0, size=(64, 64, 40),
                        spacing=(1.0, 1.0, 1.0), progress=False)
    task = load_task(root)
    preset = get_preset("phantom-spleen")
    stats = foreground_percentiles(task.training, None)
    patch, draws = (16, 16, 16), 400
    store = prepare_store(task, preset, tmp_path / "cache")
    shares = {}
    for pos, neg in ((1.0, 1.0), (1.0, 3.0), (1.0, 0.0)):
        old = CacheDataset([c.as_dict() for c in task.training],
                           preset.train_transforms(patch, stats, pos=pos, neg=neg), progress=False)
        new = StorePatchDataset(store, [c.id for c in task.training], patch, preset.read_transform(stats),
                                preset.training_target, pos=pos, neg=neg)
        for name, ds in (("old", old), ("new", new)):
            share = []
            for i in range(draws):
                if name == "old":
                    ds.transform.set_random_state(seed=i)
                    label = ds[i % 2][0]["label"]
                else:
                    label = ds.sample(i % 2, i)[0]["label"]
                assert label.shape == (1, *patch) and label.dtype == torch.float32
                share.append(float(label.mean()))
            shares[name, pos, neg] = float(np.mean(share))
        # the mean foreground share of a patch: same within sampling noise (std of the mean ~0.01)
        assert abs(shares["old", pos, neg] - shares["new", pos, neg]) < 0.04, shares
    # and the ratio matters: fewer foreground-centred patches, less foreground
    assert shares["new", 1.0, 0.0] > shares["new", 1.0, 1.0] + 0.05 > shares["new", 1.0, 3.0] + 0.1


def test_patches_are_augmented_from_the_seed_and_brats_targets_are_regions(brain, tmp_path):
    task = load_task(brain)
    preset = get_preset("phantom-brain")
    store = prepare_store(task, preset, tmp_path / "cache")
    ds = StorePatchDataset(store, [c.id for c in task.training], (24, 24, 24), None, preset.training_target,
                           num_samples=3)
    first = ds.sample(0, 7)
    again = ds.sample(0, 7)
    assert len(first) == 3
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["image"].shape == (4, 24, 24, 24) and a["label"].shape == (3, 24, 24, 24)
        assert set(torch.unique(a["label"]).tolist()) <= {0.0, 1.0}
        assert torch.all(a["label"][0] <= a["label"][1]) and torch.all(a["label"][2] <= a["label"][0])  # ET<TC<WT
    assert not torch.equal(first[0]["image"], ds.sample(0, 8)[0]["image"])


class _Threshold(torch.nn.Module):
    """A fixed 'network': logits that threshold the image, so Dice is neither 0 nor 1."""

    def __init__(self, out_channels: int, level: float) -> None:
        super().__init__()
        self.out_channels, self.level = out_channels, level

    def forward(self, x):
        if self.out_channels == 2:  # softmax: background vs foreground above the level
            return torch.cat([torch.zeros_like(x[:, :1]), 20 * (x[:, :1] - self.level)], 1)
        return 20 * (x[:, :3] - self.level)  # sigmoid regions from the first three channels


@pytest.mark.parametrize("name,level", [("phantom-spleen", 0.6), ("phantom-brain", 0.8)])
def test_validation_dice_from_the_store_equals_todays_path(spleen, brain, tmp_path, name, level):
    root = spleen if name == "phantom-spleen" else brain
    preset = get_preset(name)
    data = build_task_data(load_task(root), preset, cache_dir=tmp_path / "cache", patch_size=(16, 16, 16),
                           test_frac=0.0, val_frac=0.5)
    assert isinstance(data.val, StoreVolumeDataset) and len(data.val) == 2
    # today's validation chain (before the store): deterministic prefix, float32 labels (regions for BraTS)
    old_chain = Compose([*preset.deterministic_transforms(data.stats), CastToTyped(keys="label", dtype=np.float32)])
    model = _Threshold(preset.out_channels, level)
    dices = []
    for i, cid in enumerate(data.split.val):
        old = old_chain(load_task(root).case(cid).as_dict())
        new = data.val[i]
        scored = []
        for image, truth in ((torch.as_tensor(old["image"]), None), (new["image"], new["label"])):
            probs = predict_probabilities(model, image[None], (16, 16, 16), preset.activation, 0.25, 2, False)
            pred = class_masks(preset.label_map(probs)[:, 0], preset.scored_classes).movedim(0, 1)
            if truth is None:  # today's truth: the float32 label, painted back as the old trainer did
                label = torch.as_tensor(old["label"])[None]
                truth_map = label.round().long() if preset.activation == "softmax" else preset.label_map(label)
            else:
                truth_map = truth[None].long()
            gt = class_masks(truth_map[:, 0], preset.scored_classes).movedim(0, 1)
            scored.append(compute_dice(pred.float(), gt.float(), include_background=True, ignore_empty=False)[0])
        np.testing.assert_allclose(scored[1].numpy(), scored[0].numpy(), atol=1e-6)
        dices.append(scored[0])
    assert 0.05 < float(torch.stack(dices).mean()) < 0.999  # a real score, not a trivial 0 or 1


MEMORY_PROBE = textwrap.dedent("""
    import sys
    from beseg.data import get_preset, load_task
    from beseg.data.patches import StorePatchDataset
    from beseg.data.store import open_store

    def pss_kb():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])

    task = load_task(sys.argv[1])
    preset = get_preset("phantom-brain")
    store = open_store(task, preset, sys.argv[2])
    ds = StorePatchDataset(store, [c.id for c in task.training], (32, 32, 32), None, preset.training_target)
    ds.sample(0, 0)
    before = pss_kb()
    for rep in range(3):
        for i in range(len(ds)):
            ds.sample(i, rep * 1000 + i)
    print(pss_kb() - before)
""")


@pytest.mark.slow
def test_reading_patches_does_not_grow_memory_with_the_number_of_cases(tmp_path):
    # 12 brain cases at 1 mm of 96x96x64: ~9 MB per case in the store
    root = make_phantom(tmp_path / "brain", task="brain", cases=12, test_cases=0, size=(96, 96, 64),
                        spacing=(1.0, 1.0, 1.0), progress=False)
    growth, sizes = {}, {}
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    for n in (4, 12):
        sub = tmp_path / f"sub{n}"
        meta = json.loads((root / "dataset.json").read_text())
        meta["training"] = meta["training"][:n]
        meta["numTraining"] = n
        for entry in meta["training"]:  # the first n cases, hard-linked into a task folder of their own
            for rel in entry.values():
                (sub / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(root / rel, sub / rel)
        (sub / "dataset.json").write_text(json.dumps(meta))
        store = prepare_store(load_task(sub), get_preset("phantom-brain"), tmp_path / f"cache{n}")
        sizes[n] = store.size_bytes()
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(sub), str(tmp_path / f"cache{n}")],
                             capture_output=True, text=True, env=env, check=True)
        growth[n] = int(out.stdout.strip().splitlines()[-1]) * 1024
    extra_data = sizes[12] - sizes[4]
    assert extra_data > 50e6
    # A memory cache would grow by about the extra data (and more); reading patches grows by a small share of it.
    assert growth[12] - growth[4] < 0.15 * extra_data, (growth, sizes)


def test_cli_data_prepare_builds_the_configs_store(spleen, tmp_path, capsys):
    code = main(["data", "prepare", str(spleen), "--config", "phantom_spleen_segresnet_be",
                 f"data.cache_dir={tmp_path / 'cache'}", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "4 case(s)" in out
    stores = list((tmp_path / "cache").glob("store-phantom_spleen-*"))
    assert len(stores) == 1 and len(list(stores[0].glob("*.json"))) == 5  # 4 manifests + settings
    assert main(["data", "prepare", str(spleen), "--config", "task01_unet", "--no-progress"]) == 1
    assert "expects 4 image channel(s)" in capsys.readouterr().err


def test_beseg_cache_env_is_the_default_cache_base(spleen, tmp_path, monkeypatch):
    monkeypatch.setenv("BESEG_CACHE", str(tmp_path / "envcache"))
    store = prepare_store(load_task(spleen), get_preset("phantom-spleen"))
    assert store.root.parent.parent == tmp_path / "envcache"
