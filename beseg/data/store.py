"""The preprocessed store: every case resampled once into memory-mappable arrays, shared by every run and rank.

One store per (dataset, preprocessing settings), in the dataset's cache folder (``data.cache_dir``,
else :func:`beseg.data.intensity.default_cache_dir`, under ``$BESEG_CACHE``)::

    <cache>/store-<preset>-<settings hash>/
      settings.json              the settings the hash was made from (checked on open)
      <case>.image.npy           (C, X, Y, Z) float32, RAS, at the preset's spacing, cropped (see below)
      <case>.label.npy           (1, X, Y, Z) uint8: the dataset's own label values
      <case>.locations.npy       (M, 4) int32 rows (label value, x, y, z): up to ``locations`` voxels
                                 per label value (background included), sampled once here
      <case>.json                the case's manifest, written last: file sizes, source sizes, properties
      <case>.lock                while a process builds the case
      builds.log                 one line per case built: case, host, pid, seconds

What the store holds depends on the preset (:class:`~beseg.data.presets.TaskPreset`):

* Per-case normalisation (Task01's non-zero z-score) is applied before storing, and the case is
  cropped to the bounding box of its non-zero image voxels and labelled voxels: outside it every
  channel is exactly 0 before and after normalisation, so zero padding rebuilds the whole volume
  bit for bit (validation does).
* Dataset-level normalisation (Task09's foreground percentiles, which depend on the training
  cases) is left to reading time (:meth:`TaskPreset.read_transform` on each patch), so one store
  serves every split, fold and seed. Nothing is cropped: the scaling maps 0 to a non-zero value.

Building is case by case and safe with any number of processes on any number of machines:

* A case is built by the process that creates its ``<case>.lock`` (``O_CREAT | O_EXCL``, atomic on
  NFS); the others wait for its manifest. A lock whose process died (same machine), or that was
  not refreshed for :data:`STALE_LOCK_S` seconds (another machine; the builder refreshes it every
  few seconds), is taken over.
* Each array is written to a temporary file, fsynced and renamed; the manifest, which records
  every file's size, is written last the same way. A case whose manifest is missing, or whose
  files do not have the recorded sizes (a truncated copy, a crash), or whose source files changed
  size, is rebuilt, never loaded.
* The settings are hashed into the folder name and written to ``settings.json``; a folder whose
  ``settings.json`` disagrees is refused, so a store from other settings is never read.

Sizes: float32 images and uint8 labels, uncompressed (a memory map reads a patch without
decompressing anything). Task09 at 1 mm: about 0.37 GB per case; Task01 (4 channels, cropped):
about 0.1 GB per case (docs/benchmarks.md has the measured figures).

Readers open the arrays with ``np.load(mmap_mode="r")`` for each read and close them after, so a
process holds only the patch it copies, and every process on a machine shares the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from beseg.data.intensity import default_cache_dir
from beseg.data.msd import Case, MSDTask
from beseg.data.nifti import read_header, read_image_header
from beseg.data.presets import TaskPreset
from beseg.errors import DataError
from beseg.fileio import atomic_write_text, lock_holder, release_lock, touch_lock, try_lock

__all__ = ["STORE_VERSION", "CaseArrays", "Store", "StoreSettings", "open_store", "prepare_store"]

#: Bumped whenever what the store writes changes, so older stores are never read.
#: 2: z-scored images clear resampling noise first (presets.ClearResamplingNoised).
STORE_VERSION = 2
#: Voxel locations sampled per label value at preparation (nnU-Net samples 10,000 per class).
DEFAULT_LOCATIONS = 10_000
#: A lock of another machine not refreshed for this long is stale (its builder died).
STALE_LOCK_S = 600.0
#: How often a builder refreshes its lock, and a waiter looks again (seconds).
HEARTBEAT_S = 5.0
POLL_S = 0.2


@dataclass(frozen=True)
class StoreSettings:
    """Everything that changes what the store holds; hashed into its folder name.

    Attributes:
        preset: the preset's name (informative; the fields below decide the content).
        pixdim: voxel spacing (mm) cases are resampled to, in RAS orientation.
        in_channels: image channels.
        normalized: ``"zscore_nonzero"`` when images are stored normalised, ``"none"`` for raw intensities.
        crop: cases cropped to their non-zero bounding box.
        locations: voxel locations sampled per label value.
        version: :data:`STORE_VERSION`.
    """

    preset: str
    pixdim: tuple[float, float, float]
    in_channels: int
    normalized: str
    crop: bool
    locations: int = DEFAULT_LOCATIONS
    version: int = STORE_VERSION

    @classmethod
    def for_preset(cls, preset: TaskPreset, locations: int = DEFAULT_LOCATIONS) -> "StoreSettings":
        return cls(preset.name, tuple(float(p) for p in preset.pixdim), preset.in_channels,  # type: ignore[arg-type]
                   preset.normalization if preset.store_normalizes else "none", preset.crop_nonzero, int(locations))

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @property
    def digest(self) -> str:
        content = {k: v for k, v in self.as_dict().items() if k != "preset"}
        return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class CaseArrays:
    """One stored case, as read back.

    Attributes:
        image: (C, X, Y, Z) float32, memory-mapped read-only (or a copy).
        label: (1, X, Y, Z) uint8, likewise.
        locations: (M, 4) int32 rows ``(label value, x, y, z)`` in the stored (cropped) grid.
        properties: the manifest's ``properties`` (see :meth:`Store.build_case`).
    """

    image: np.ndarray
    label: np.ndarray
    locations: np.ndarray
    properties: dict[str, Any]


class Store:
    """A preprocessed store folder (see the module docstring); made by :func:`open_store`.

    Args:
        root: the store folder.
        settings: its settings.
        preset: the preset whose :meth:`~TaskPreset.store_transforms` build a case.
    """

    def __init__(self, root: Path, settings: StoreSettings, preset: TaskPreset) -> None:
        self.root, self.settings, self.preset = Path(root), settings, preset

    # -- paths ----------------------------------------------------------------------------------

    def path(self, case_id: str, what: str) -> Path:
        """``what``: ``image``, ``label``, ``locations`` (arrays), ``json`` (manifest) or ``lock``."""
        suffix = {"image": ".image.npy", "label": ".label.npy", "locations": ".locations.npy",
                  "json": ".json", "lock": ".lock"}[what]
        return self.root / f"{case_id}{suffix}"

    # -- state ----------------------------------------------------------------------------------

    def manifest(self, case: Case) -> dict[str, Any] | None:
        """The case's manifest if the case is complete and current, else ``None``.

        Complete: every array file has the size the manifest recorded (a truncated or half-copied
        file does not). Current: the manifest was made with these settings from source files of the
        sizes they have now.
        """
        try:
            info = json.loads(self.path(case.id, "json").read_text())
            if info.get("settings") != self.settings.digest or info.get("source") != _source_sizes(case):
                return None
            for what, size in info["files"].items():
                if self.path(case.id, what).stat().st_size != size:
                    return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return info

    def ready(self, case: Case) -> bool:
        return self.manifest(case) is not None

    # -- building -------------------------------------------------------------------------------

    def ensure(self, case: Case, poll_s: float = POLL_S) -> bool:
        """Make sure ``case`` is stored: build it under its lock, or wait for the process building it.

        Returns:
            True if this process built it, False if it was there or another process built it.

        Raises:
            DataError: the case's files cannot be read or do not fit the preset.
        """
        lock = self.path(case.id, "lock")
        while not self.ready(case):
            if try_lock(lock):
                try:
                    if self.ready(case):  # finished between our check and our lock
                        return False
                    self.build_case(case, lock)
                    return True
                finally:
                    release_lock(lock)
            seen = _read(lock)
            if lock_holder(lock, STALE_LOCK_S) is None:
                _take_over(lock, seen)  # its builder died: the next round builds it
                continue
            time.sleep(poll_s)
        return False

    def build_case(self, case: Case, lock: Path | None = None) -> dict[str, Any]:
        """Preprocess ``case`` and write its files atomically, the manifest last (call it holding the lock).

        Returns:
            The manifest. Its ``properties``: ``original_shape`` (spatial voxels), ``original_spacing``
            (mm) and ``original_affine`` of the source image; ``shape`` (the whole resampled grid,
            voxels at :attr:`StoreSettings.pixdim`) and ``affine`` (its RAS affine); ``bbox``
            (``[[start, stop], ...]`` of the stored crop in that grid); ``label_counts``
            (``{label value: voxels}``).

        Raises:
            DataError: the files cannot be read or do not fit the preset.
        """
        start = time.perf_counter()
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True) if lock else None
        if beat is not None:
            beat.start()
        try:
            # The shared input check first, so that a bad file gets the message evaluate, score and
            # predict give (naming the file that is wrong), not the wrapper text of MONAI's loader.
            # (Whether the label lies on the image's grid is the caller's check, at the caller's tolerance.)
            read_image_header(case.image, self.preset.in_channels, f"task {self.preset.name}")
            read_header(case.label)
            try:
                out = self.preset.store_transforms()(case.as_dict())
            except Exception as err:  # MONAI wraps reader errors in RuntimeError
                while err.__cause__ is not None:
                    err = err.__cause__
                raise DataError(f"{case.image}: cannot preprocess case {case.id!r} for the store: "
                                f"{str(err).splitlines()[-1][:300]}") from None
            image = np.asarray(out["image"], dtype=np.float32)
            label = np.asarray(out["label"], dtype=np.uint8)
            full_shape = list(image.shape[1:])
            affine = np.asarray(out["image"].affine, dtype=np.float64).tolist()
            bbox = _nonzero_bbox(image, label) if self.settings.crop else [[0, n] for n in full_shape]
            crop = (slice(None), *(slice(a, b) for a, b in bbox))
            image, label = np.ascontiguousarray(image[crop]), np.ascontiguousarray(label[crop])
            del out
            locations, counts = sample_locations(label[0], self.settings.locations, _case_seed(case.id))
            header = nib.load(str(case.image)).header
            props = {
                "original_shape": [int(n) for n in header.get_data_shape()[:3]],
                "original_spacing": [float(z) for z in header.get_zooms()[:3]],
                "original_affine": np.asarray(nib.load(str(case.image)).affine, dtype=np.float64).tolist(),
                "shape": full_shape, "affine": affine, "bbox": bbox, "label_counts": counts,
                "channels": int(image.shape[0]),
            }
            files = {}
            for what, array in (("image", image), ("label", label), ("locations", locations)):
                files[what] = _write_array(self.path(case.id, what), array)
                if lock is not None:
                    touch_lock(lock)
            info = {"case": case.id, "settings": self.settings.digest, "source": _source_sizes(case),
                    "files": files, "properties": props}
            manifest = atomic_write_text(self.path(case.id, "json"), json.dumps(info, indent=1))
            os.chmod(manifest, 0o644)  # readable by every user sharing the store, like the arrays
            _fsync_dir(self.root)
        finally:
            stop.set()
        with open(self.root / "builds.log", "a") as f:
            f.write(f"{case.id}\t{socket.gethostname()}\t{os.getpid()}\t{time.perf_counter() - start:.1f}\n")
        return info

    # -- reading --------------------------------------------------------------------------------

    def properties(self, case: Case) -> dict[str, Any]:
        """The stored case's properties (see :meth:`build_case`).

        Raises:
            DataError: the case is not (or no longer) complete in the store.
        """
        info = self.manifest(case)
        if info is None:
            raise DataError(f"{self.path(case.id, 'json')}: case {case.id!r} is not complete in the store {self.root}; "
                            "run `beseg data prepare` (or training) to build it.")
        return info["properties"]

    def open(self, case_id: str) -> CaseArrays:
        """The case's arrays, memory-mapped read-only (no size checks: use after :meth:`ensure`).

        Close them by dropping the references; :class:`~beseg.data.store_datasets.StorePatchDataset`
        opens them per read so a process never keeps pages of other cases mapped.
        """
        info = json.loads(self.path(case_id, "json").read_text())
        return CaseArrays(np.load(self.path(case_id, "image"), mmap_mode="r"),
                          np.load(self.path(case_id, "label"), mmap_mode="r"),
                          np.load(self.path(case_id, "locations")), info["properties"])

    def volume(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole resampled volume, crop undone by zero padding: ``(image (C, *shape) float32,
        label (1, *shape) uint8)``, as the preset's deterministic chain makes it (before any
        :meth:`TaskPreset.read_transform`)."""
        arrays = self.open(case_id)
        props = arrays.properties
        shape = tuple(props["shape"])
        region = (slice(None), *(slice(a, b) for a, b in props["bbox"]))
        image = np.zeros((arrays.image.shape[0], *shape), np.float32)
        label = np.zeros((1, *shape), np.uint8)
        image[region] = arrays.image
        label[region] = arrays.label
        return image, label

    def size_bytes(self) -> int:
        """Bytes of the store's files on disk."""
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())


# ----------------------------------------------------------------------------------------------
# opening and preparing


def open_store(task: MSDTask, preset: TaskPreset, cache_dir: str | Path | None = None,
               locations: int = DEFAULT_LOCATIONS) -> Store:
    """The store of ``task`` for ``preset`` (created empty if new; nothing is built here).

    Args:
        task: the dataset.
        preset: its preset (decides the settings).
        cache_dir: the dataset's cache folder; default :func:`default_cache_dir` (``$BESEG_CACHE``).
        locations: voxel locations sampled per label value.

    Raises:
        DataError: the folder's ``settings.json`` belongs to other settings (never reused), or the
            folder cannot be created.
    """
    settings = StoreSettings.for_preset(preset, locations)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir(task.root)
    root = base / f"store-{preset.name}-{settings.digest}"
    wanted = settings.as_dict()
    record = root / "settings.json"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not record.is_file():
            os.chmod(atomic_write_text(record, json.dumps(wanted, indent=1)), 0o644)
        found = json.loads(record.read_text())
    except OSError as err:
        raise DataError(f"{root}: cannot create the preprocessed store: {err.strerror or err}.") from None
    except ValueError:
        found = None
    if found != wanted:
        raise DataError(f"{record}: this store was made with other preprocessing settings ({found}) than "
                        f"{wanted}; it is never reused. Delete the folder {root} to rebuild it.")
    return Store(root, settings, preset)


def _build_one(store: Store, case: Case) -> tuple[str, bool]:
    return case.id, store.ensure(case)


def prepare_store(task: MSDTask, preset: TaskPreset, cache_dir: str | Path | None = None,
                  cases: Sequence[Case] | None = None, workers: int = 1, progress: bool = False,
                  locations: int = DEFAULT_LOCATIONS) -> Store:
    """Build every missing case of the store (other processes may build some at the same time).

    Args:
        task, preset, cache_dir, locations: see :func:`open_store`.
        cases: the cases to store; default every labelled case of the task.
        workers: processes building cases in parallel (each needs about 4x a resampled case in RAM).
        progress: show a tqdm bar over the cases.

    Returns:
        The :class:`Store`, every requested case complete.

    Raises:
        DataError: a case cannot be read or does not fit the preset (the other cases are kept).
    """
    from tqdm.auto import tqdm

    store = open_store(task, preset, cache_dir, locations)
    cases = list(task.training if cases is None else cases)
    todo = [c for c in cases if not store.ready(c)]
    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), desc=f"store {store.root.name}", unit="case",
               disable=not progress, dynamic_ncols=True)
    try:
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(workers, len(todo))) as pool:
                for _ in pool.map(_build_one, [store] * len(todo), todo):
                    bar.update(1)
        else:
            for case in todo:
                store.ensure(case)
                bar.update(1)
    finally:
        bar.close()
    return store


# ----------------------------------------------------------------------------------------------
# helpers


def sample_locations(label: np.ndarray, per_value: int, seed: int) -> tuple[np.ndarray, dict[str, int]]:
    """Up to ``per_value`` voxel locations of every label value, drawn without replacement.

    Background (0) locations are found by rejection sampling, so a 74-million-voxel CT never gets a
    full index array; the (small) foreground classes are listed exactly, then subsampled.

    Args:
        label: (X, Y, Z) integer label map.
        per_value: locations per value.
        seed: the case's seed (same case, same locations).

    Returns:
        ``(locations, counts)``: (M, 4) int32 rows ``(value, x, y, z)``; ``{str(value): voxels}``.
    """
    rng = np.random.default_rng(seed)
    flat = label.reshape(-1)
    values, counts = np.unique(flat, return_counts=True)
    rows = []
    for value, count in zip(values.tolist(), counts.tolist()):
        n = min(per_value, count)
        if value == 0 and count > 4 * n:
            picked = np.empty(0, np.int64)
            while picked.size < n:
                draw = rng.integers(0, flat.size, size=2 * n)
                picked = np.unique(np.concatenate([picked, draw[flat[draw] == 0]]))
            picked = rng.permutation(picked)[:n]
        else:
            where = np.flatnonzero(flat == value)
            picked = where if n == where.size else rng.choice(where, size=n, replace=False)
        xyz = np.stack(np.unravel_index(np.sort(picked), label.shape), axis=1)
        rows.append(np.concatenate([np.full((n, 1), value), xyz], axis=1))
    locations = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)
    return locations, {str(v): int(c) for v, c in zip(values.tolist(), counts.tolist())}


def _nonzero_bbox(image: np.ndarray, label: np.ndarray) -> list[list[int]]:
    """``[[start, stop], ...]`` per spatial axis of the voxels non-zero in any channel or labelled."""
    mask = np.any(image != 0, axis=0) | np.any(label != 0, axis=0)
    if not mask.any():
        return [[0, n] for n in mask.shape]
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def _source_sizes(case: Case) -> dict[str, int]:
    """Sizes of the case's source files: a changed file (almost always a changed size) rebuilds the case.

    Sizes, not modification times, so copies of one dataset on several machines share a store."""
    return {"image": Path(case.image).stat().st_size, "label": Path(case.label).stat().st_size}


def _case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha1(case_id.encode()).digest()[:4], "little")


def _write_array(path: Path, array: np.ndarray) -> int:
    """``np.save`` to a temporary file beside ``path``, fsync, rename; returns the file's size."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (NFS clients) refuse a directory fsync; the renames are done
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _take_over(lock: Path, seen: str | None) -> None:
    """Remove a stale lock, unless it changed since it was judged stale (another waiter took over first
    and holds a fresh lock). Were two processes still to build one case, each writes its own temporary
    files and renames them whole, so the case stays consistent; it is only built twice."""
    if _read(lock) == seen:
        lock.unlink(missing_ok=True)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        touch_lock(lock)
