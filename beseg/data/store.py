"""The preprocessed store: every case resampled once into memory-mappable arrays, shared by every run and rank.

One store per (dataset, preprocessing settings), in the dataset's cache folder (``data.cache_dir``,
else :func:`beseg.data.intensity.default_cache_dir`, under ``$BESEG_CACHE``)::

    <cache>/store-<preset>-<settings hash>/
      settings.json              the settings the hash was made from (checked on open)
      <case>.image.npy           (C, X, Y, Z) float32, RAS, at the preset's spacing, cropped (see below)
      <case>.label.npy           (1, X, Y, Z) uint8: the dataset's own label values
      <case>.locations.npy       (M, 4) int32 rows (label value, x, y, z): up to ``locations`` voxels
                                 per label value (background included), sampled once here
      <case>.json                the case's manifest, written last: file sizes, source files' size,
                                 modification time and (small files) SHA-256, properties
      <case>.lock                while a process builds the case (a :class:`beseg.fileio.FileLock`,
                                 with its holder's heartbeat <case>.lock.<token>)
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

* A case is built by the process that takes its ``<case>.lock`` (:class:`beseg.fileio.FileLock`, the
  primitive the run claims use too: created atomically, also on NFS); the others wait for its
  manifest, and say once whom they wait for. A lock whose holder is provably gone is taken over with
  a warning: its process is dead or its pid reused (same machine), or its heartbeat (refreshed every
  :data:`HEARTBEAT_S`) has not changed for :data:`STALE_LOCK_S` (any machine; ``BESEG_STORE_LOCK_*``
  change both). A builder that was taken over (stopped past the limit) stops before its next rename
  and waits for the new builder.
* Each array is written to a temporary file (``.<case>.<what>.<random>.tmp``), fsynced and renamed;
  the manifest is written last the same way. A builder removes the temporary files a killed builder
  of its case left; ``beseg data check --store --fix`` removes those of every case.
* A case is rebuilt, never loaded, when its manifest is missing, its files do not have the recorded
  sizes (a truncated copy, a crash), or its source files changed: another size; for files up to
  ``hash_limit`` bytes (labels, most compressed images) another SHA-256; for larger ones another
  modification time. ``beseg data check --store`` lists stale and orphaned cases and leftovers.
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
import re
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np

from beseg.data.intensity import default_cache_dir
from beseg.data.msd import Case, MSDTask
from beseg.data.nifti import read_header, read_image_header
from beseg.data.presets import TaskPreset
from beseg.errors import ConfigError, DataError
from beseg.fileio import FileLock, LockBusyError, LockLostError, LockTimings, atomic_output, atomic_write_text

__all__ = ["STORE_VERSION", "CaseArrays", "Store", "StoreAudit", "StoreSettings", "open_store", "prepare_store",
           "store_root"]

#: Bumped whenever what the store writes changes, so older stores are never read.
#: 2: z-scored images clear resampling noise first (presets.ClearResamplingNoised).
STORE_VERSION = 2
#: Voxel locations sampled per label value at preparation (nnU-Net samples 10,000 per class).
DEFAULT_LOCATIONS = 10_000
#: A case lock whose heartbeat has not changed for this long is stale (its builder died or hangs).
STALE_LOCK_S = 600.0
#: How often a builder refreshes its lock's heartbeat, and a waiter looks again (seconds).
HEARTBEAT_S = 5.0
POLL_S = 0.2
#: Source files up to this size are compared by SHA-256 (larger ones by size and modification time);
#: ``BESEG_STORE_HASH_MB`` changes it.
HASH_LIMIT_BYTES = 8 << 20
_STORE_FILES = {"settings.json", "builds.log"}
_CASE_FILE = re.compile(r"^(?P<case>.+)\.(?P<what>image\.npy|label\.npy|locations\.npy|json|lock)"
                        r"(?P<beat>\.[0-9a-f]{32}|\.takeover)?$")
_TEMP_FILE = re.compile(r"^\.(?P<case>.+)\.(image\.npy|label\.npy|locations\.npy|json|lock)\..*\.tmp$")


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
        hash_limit: source files up to this many bytes are compared by SHA-256 (``None``: every file,
            as ``beseg data check --store --hash`` asks); larger ones by modification time.
    """

    def __init__(self, root: Path, settings: StoreSettings, preset: TaskPreset,
                 hash_limit: int | None = HASH_LIMIT_BYTES) -> None:
        self.root, self.settings, self.preset = Path(root), settings, preset
        self.hash_limit = hash_limit
        self.timings = LockTimings.from_env("STORE_LOCK", HEARTBEAT_S, STALE_LOCK_S)
        self._digests: dict[tuple[str, int, int, int, int], str] = {}  # (path, size, times, inode) -> SHA-256
        self._told_waiting = False

    # -- paths ----------------------------------------------------------------------------------

    def path(self, case_id: str, what: str) -> Path:
        """``what``: ``image``, ``label``, ``locations`` (arrays), ``json`` (manifest) or ``lock``."""
        suffix = {"image": ".image.npy", "label": ".label.npy", "locations": ".locations.npy",
                  "json": ".json", "lock": ".lock"}[what]
        return self.root / f"{case_id}{suffix}"

    def case_lock(self, case_id: str, on_takeover: Callable[[str], None] | None = None) -> FileLock:
        """The lock a builder of ``case_id`` holds (:class:`beseg.fileio.FileLock`)."""
        return FileLock(self.path(case_id, "lock"), self.timings, noun="lock",
                        label=f"case {case_id} of the store {self.root}", on_takeover=on_takeover)

    def leftovers(self, case_id: str) -> list[Path]:
        """Temporary files of ``case_id`` (``.<case>.<what>.<random>.tmp``): a builder killed between writing
        and renaming leaves them (up to a whole resampled case). Only leftovers while nobody holds the lock."""
        out = []
        for path in self.root.glob(f".{case_id}.*.tmp"):
            found = _TEMP_FILE.match(path.name)
            if found and found.group("case") == case_id:
                out.append(path)
        return sorted(out)

    # -- state ----------------------------------------------------------------------------------

    def state(self, case: Case) -> tuple[dict[str, Any] | None, str]:
        """``(manifest, "current")`` if the case is complete and current, else ``(None, why not)``.

        Complete: every array file has the size the manifest recorded (a truncated or half-copied
        file does not). Current: the manifest was made with these settings from source files with the
        content they have now (see the module docstring).
        """
        try:
            text = self.path(case.id, "json").read_text()
        except FileNotFoundError:
            return None, "not built"
        except OSError as err:
            return None, f"manifest unreadable ({err.strerror or err})"
        try:
            info = json.loads(text)
            if info.get("settings") != self.settings.digest:
                return None, "built with other settings"
            for what in ("image", "label"):
                changed = self._source_changed(info["source"][what], getattr(case, what))
                if changed:
                    return None, f"source {what} {getattr(case, what)} {changed} since it was stored"
            for what, size in info["files"].items():
                path = self.path(case.id, what)
                if not path.is_file():
                    return None, f"{path.name} is missing"
                if path.stat().st_size != size:
                    return None, f"{path.name} has {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
        except FileNotFoundError as err:
            return None, f"{err.filename} is missing"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None, "manifest unreadable or of an older beseg"
        return info, "current"

    def manifest(self, case: Case) -> dict[str, Any] | None:
        """The case's manifest if the case is complete and current (:meth:`state`), else ``None``."""
        return self.state(case)[0]

    def ready(self, case: Case) -> bool:
        return self.manifest(case) is not None

    def _source_record(self, path: Path) -> dict[str, Any]:
        """What the manifest records of a source file: size, modification time, and (up to the hash limit) SHA-256."""
        st = path.stat()
        hashed = self.hash_limit is None or st.st_size <= self.hash_limit
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": self._digest(path, st) if hashed else None}

    def _source_changed(self, recorded: dict[str, Any], path: Path) -> str | None:
        """How a source file differs from its record (None: the same content, as far as it is checked)."""
        st = path.stat()
        if not isinstance(recorded, dict):
            return "has no content record (stored by an older beseg)"
        if recorded.get("size") != st.st_size:
            return "changed size"
        if recorded.get("sha256") and (self.hash_limit is None or st.st_size <= self.hash_limit):
            # Content decides where reading it is cheap: a copy with new times is the same, an edit that
            # kept size and time is not.
            return "changed content (SHA-256)" if self._digest(path, st) != recorded["sha256"] else None
        return "was modified" if recorded.get("mtime_ns") != st.st_mtime_ns else None

    def _digest(self, path: Path, st: os.stat_result) -> str:
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)  # any write or touch changes ctime
        if key not in self._digests:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._digests[key] = h.hexdigest()
        return self._digests[key]

    # -- building -------------------------------------------------------------------------------

    def ensure(self, case: Case, poll_s: float = POLL_S) -> bool:
        """Make sure ``case`` is stored: build it under its lock, or wait for the process building it.

        Returns:
            True if this process built it, False if it was there or another process built it.

        Raises:
            DataError: the case's files cannot be read or do not fit the preset, or a file cannot be
                written (a full disk; nothing half-written is left).
        """
        lock = self.case_lock(case.id)
        while not self.ready(case):
            try:
                taken = lock.acquire()
            except LockBusyError as busy:
                if not self._told_waiting:  # once per store object: not a line per case of a big dataset
                    who = lock.describe(busy.holder) if busy.holder else "another process"
                    print(f"store: waiting for case {case.id}, which {who} is building (lock {lock.path}); "
                          "other processes' cases are waited for likewise", file=sys.stderr, flush=True)
                    self._told_waiting = True
                time.sleep(poll_s)
                continue
            try:
                if self.ready(case):  # finished between our check and our lock
                    return False
                for path in self.leftovers(case.id):  # a killed builder's half-written files
                    path.unlink(missing_ok=True)
                self.build_case(case, lock)
                return True
            except LockLostError as lost:  # stopped past the limit and taken over: the new builder's case counts
                print(f"store: {lost}", file=sys.stderr, flush=True)
            finally:
                if taken:
                    lock.release()
        return False

    def build_case(self, case: Case, lock: FileLock | None = None) -> dict[str, Any]:
        """Preprocess ``case`` and write its files atomically, the manifest last (call it holding the lock).

        Args:
            case: the case.
            lock: its lock, held: every rename is fenced by it (:meth:`FileLock.check`).

        Returns:
            The manifest. Its ``properties``: ``original_shape`` (spatial voxels), ``original_spacing``
            (mm) and ``original_affine`` of the source image; ``shape`` (the whole resampled grid,
            voxels at :attr:`StoreSettings.pixdim`) and ``affine`` (its RAS affine); ``bbox``
            (``[[start, stop], ...]`` of the stored crop in that grid); ``label_counts``
            (``{label value: voxels}``).

        Raises:
            DataError: the files cannot be read or do not fit the preset, or a file cannot be written
                (``could not write <file>: No space left on device``; no temporary file is left).
            LockLostError: ``lock`` was taken over meanwhile.
        """
        start = time.perf_counter()
        fence = lock.check if lock is not None else None
        # The shared input check first, so that a bad file gets the message evaluate, score and
        # predict give (naming the file that is wrong), not the wrapper text of MONAI's loader.
        # (Whether the label lies on the image's grid is the caller's check, at the caller's tolerance.)
        read_image_header(case.image, self.preset.in_channels, f"task {self.preset.name}")
        read_header(case.label)
        source = {"image": self._source_record(case.image), "label": self._source_record(case.label)}
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
        try:
            files = {}
            for what, array in (("image", image), ("label", label), ("locations", locations)):
                files[what] = _write_array(self.path(case.id, what), array, fence)
            info = {"case": case.id, "settings": self.settings.digest, "source": source, "files": files,
                    "properties": props}
            with atomic_output(self.path(case.id, "json"), fence=fence) as tmp:
                tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
                os.chmod(tmp, 0o644)  # readable by every user sharing the store, like the arrays
            _fsync_dir(self.root)
        except OSError as err:
            raise DataError(f"could not write {err.filename or self.root}: {err.strerror or err}; case {case.id!r} "
                            "was not stored (nothing half-written is left) and is built again next time.") from None
        try:
            with open(self.root / "builds.log", "a") as f:
                f.write(f"{case.id}\t{socket.gethostname()}\t{os.getpid()}\t{time.perf_counter() - start:.1f}\n")
        except OSError:
            pass  # the case is stored; only its line in the log is missing
        return info

    # -- checking ---------------------------------------------------------------------------------

    def audit(self, cases: Sequence[Case]) -> "StoreAudit":
        """What ``beseg data check --store`` reports: the state of every file in the store.

        Args:
            cases: the dataset's labelled cases (any other case in the store is an orphan).

        Returns:
            A :class:`StoreAudit`.
        """
        audit = StoreAudit(self.root)
        known = {c.id: c for c in cases}
        busy: set[str] = set()
        names = _names(self.root)
        by_case: dict[str, list[str]] = {}
        for name in names:
            found = _CASE_FILE.match(name) or _TEMP_FILE.match(name)
            if found:
                by_case.setdefault(found.group("case"), []).append(name)
        for case_id in sorted(by_case):
            lock = self.case_lock(case_id)
            held = lock.read()
            if held is not None:
                reason = lock.gone_reason(held)
                if reason is None:
                    busy.add(case_id)
                    audit.busy.append((case_id, lock.describe(held) if held else "an unreadable lock"))
                    continue
                audit.stale_locks.append((case_id, reason))
            if case_id not in known:
                audit.orphans.append((case_id, sorted(self.root / n for n in by_case[case_id])))
                continue
            audit.leftovers += self.leftovers(case_id)
            for name in by_case[case_id]:  # heartbeat and guard files of no current holder
                found = _CASE_FILE.match(name)
                if found and found.group("beat") and found.group("beat")[1:] != (held or {}).get("token"):
                    audit.leftovers.append(self.root / name)
        for case in cases:
            if case.id in busy:
                continue
            info, why = self.state(case)
            if info is not None:
                audit.current.append(case.id)
            elif why == "not built":
                audit.missing.append(case.id)
            else:
                audit.stale.append((case.id, why))
        return audit

    def fix(self, audit: "StoreAudit", cases: Sequence[Case] = (), log: Callable[[str], None] = print) -> int:
        """Remove what ``audit`` found: stale cases' and orphans' files, leftovers, gone builders' locks.

        Each case is cleaned holding its lock, so a case a live process builds is left alone, and a stale
        case that was rebuilt since the audit is kept.

        Args:
            audit: from :meth:`audit`.
            cases: the cases audited (to look at a stale case again under its lock).
            log: receives one line per case skipped and per lock taken over.

        Returns:
            The number of files removed.
        """
        removed = 0
        targets: dict[str, list[Path]] = {}
        rebuilt = {c.id: c for c in cases}
        for case_id, _ in audit.stale:
            targets.setdefault(case_id, []).extend(
                self.path(case_id, w) for w in ("image", "label", "locations", "json"))
        for case_id, files in audit.orphans:
            targets.setdefault(case_id, []).extend(files)
        for path in audit.leftovers:
            found = _TEMP_FILE.match(path.name) or _CASE_FILE.match(path.name)
            if found:
                targets.setdefault(found.group("case"), []).append(path)
        for case_id, _ in audit.stale_locks:
            targets.setdefault(case_id, [])
        for case_id, files in sorted(targets.items()):
            lock = self.case_lock(case_id, on_takeover=log)
            try:
                taken = lock.acquire()
            except LockBusyError as busy:
                log(f"{self.path(case_id, 'lock')}: skipped, {lock.describe(busy.holder)} holds it now")
                continue
            try:
                if case_id in rebuilt and self.ready(rebuilt[case_id]):  # rebuilt since the audit: keep its arrays
                    files = [p for p in files if not _CASE_FILE.match(p.name) or _CASE_FILE.match(p.name)["beat"]]
                mine = {lock.path, lock.beat_path(lock.token or "")}  # (a guard left now is a dead taker's)
                for path in files:
                    if path not in mine and path.exists():
                        path.unlink()
                        removed += 1
            finally:
                if taken:
                    lock.release()
        return removed

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


@dataclass
class StoreAudit:
    """The state of a store's files (:meth:`Store.audit`; ``beseg data check --store``).

    Attributes:
        root: the store folder.
        current: cases complete and current.
        missing: cases not built yet (not a problem: training builds them).
        stale: ``(case, why)``: built, but incomplete or from other source content or settings.
        orphans: ``(case, files)``: cases the dataset no longer has.
        leftovers: temporary files of killed builders, heartbeat files of no holder.
        stale_locks: ``(case, why)``: locks whose builder is gone.
        busy: ``(case, holder)``: cases a live process builds now (left alone).
    """

    root: Path
    current: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    stale: list[tuple[str, str]] = field(default_factory=list)
    orphans: list[tuple[str, list[Path]]] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    stale_locks: list[tuple[str, str]] = field(default_factory=list)
    busy: list[tuple[str, str]] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.stale) + len(self.orphans) + len(self.leftovers) + len(self.stale_locks)

    def lines(self) -> list[str]:
        """One line per finding, each naming the file or case."""
        out = [f"stale: case {case}: {why}" for case, why in self.stale]
        out += [f"orphaned: case {case} is not in the dataset ({len(files)} file(s): "
                f"{', '.join(p.name for p in files[:4])}{', ...' if len(files) > 4 else ''})"
                for case, files in self.orphans]
        out += [f"leftover: {path} ({_size(path)})" for path in self.leftovers]
        out += [f"stale lock: case {case}: {why}" for case, why in self.stale_locks]
        out += [f"busy: case {case} is being built by {who} (left alone)" for case, who in self.busy]
        return out

    def summary(self) -> str:
        return (f"store {self.root}: {len(self.current)} current, {len(self.missing)} not built, {len(self.stale)} "
                f"stale, {len(self.orphans)} orphaned case(s); {len(self.leftovers)} leftover file(s), "
                f"{len(self.stale_locks)} stale lock(s)")


def _names(root: Path) -> list[str]:
    """Names of the files in a store folder, its own records (settings, build log) left out."""
    try:
        return sorted(n for n in os.listdir(root) if n not in _STORE_FILES)
    except FileNotFoundError:
        return []


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size / 1e6:.1f} MB"
    except OSError:
        return "gone"


# ----------------------------------------------------------------------------------------------
# opening and preparing


def open_store(task: MSDTask, preset: TaskPreset, cache_dir: str | Path | None = None,
               locations: int = DEFAULT_LOCATIONS, hash_all: bool = False) -> Store:
    """The store of ``task`` for ``preset`` (created empty if new; nothing is built here).

    Args:
        task: the dataset.
        preset: its preset (decides the settings).
        cache_dir: the dataset's cache folder; default :func:`default_cache_dir` (``$BESEG_CACHE``).
        locations: voxel locations sampled per label value.
        hash_all: compare every source file by SHA-256, whatever its size (default: files up to
            :data:`HASH_LIMIT_BYTES`, or ``BESEG_STORE_HASH_MB`` megabytes).

    Raises:
        DataError: the folder's ``settings.json`` belongs to other settings (never reused), or the
            folder cannot be created.
        ConfigError: ``BESEG_STORE_HASH_MB`` is not a number.
    """
    settings = StoreSettings.for_preset(preset, locations)
    root = store_root(task, preset, cache_dir, locations)
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
    return Store(root, settings, preset, None if hash_all else _hash_limit())


def store_root(task: MSDTask, preset: TaskPreset, cache_dir: str | Path | None = None,
               locations: int = DEFAULT_LOCATIONS) -> Path:
    """Where :func:`open_store` keeps the store of ``task`` for ``preset`` (nothing is created)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir(task.root)
    return base / f"store-{preset.name}-{StoreSettings.for_preset(preset, locations).digest}"


def _hash_limit() -> int:
    """:data:`HASH_LIMIT_BYTES`, or ``BESEG_STORE_HASH_MB`` megabytes."""
    text = os.environ.get("BESEG_STORE_HASH_MB", "").strip()
    if not text:
        return HASH_LIMIT_BYTES
    try:
        return int(float(text) * (1 << 20))
    except ValueError:
        raise ConfigError(f"BESEG_STORE_HASH_MB={text!r}: expected a number of megabytes.") from None


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


def _case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha1(case_id.encode()).digest()[:4], "little")


def _write_array(path: Path, array: np.ndarray, fence: Callable[[], None] | None = None) -> int:
    """``np.save`` to a temporary file beside ``path``, fsync, rename (after ``fence``); returns the file's size."""
    with atomic_output(path, fence=fence) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # readable by every user sharing the store
        size = tmp.stat().st_size
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
