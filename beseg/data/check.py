"""``beseg data check``: validate an MSD task folder before anyone spends GPU hours on it.

Every problem of every case is collected in one run (not just the first): entries of
``dataset.json`` whose path leaves the task folder or that repeat a case, missing files, unreadable
or corrupt NIfTI, image/label shape or affine mismatches, wrong channel counts, NaN/Inf voxels,
non-integer or undeclared label values. Each problem names the file (or the ``dataset.json``
entry) and says what is wrong. A file whose path leaves the task folder is never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from beseg.data.msd import BadEntry, Case, MSDTask, is_apple_double, load_task, parse_task
from beseg.data.nifti import NiftiHeader, read_array
from beseg.errors import DataError
from beseg.fileio import atomic_write_text

__all__ = ["AFFINE_TOL", "CaseReport", "CheckReport", "as_task", "check_task", "remember_pass", "require_valid_task"]

#: Default largest difference between an image's and its label's affine entries (mm; mm/voxel).
AFFINE_TOL = 1e-3


@dataclass
class CaseReport:
    """What was found for one training case.

    Attributes:
        id: the case id.
        shape: spatial shape of the image (voxels), or ``None`` if unreadable.
        spacing: voxel size (mm), or ``None``.
        channels: image channels, or ``None``.
        label_volumes: label value -> volume (mL) for each non-background declared label.
        problems: one message per problem, each naming the file.
    """

    id: str
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    channels: int | None = None
    label_volumes: dict[int, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """Result of :func:`check_task`.

    Attributes:
        root: the task folder.
        task: the parsed ``dataset.json`` (``None`` if it could not be parsed).
        cases: one :class:`CaseReport` per training case.
        problems: folder-level problems (``dataset.json``, test images).
        ignored: AppleDouble ``._`` files seen and ignored.
        test_images: number of test images checked.
    """

    root: Path
    task: MSDTask | None = None
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ignored: int = 0
    test_images: int = 0

    @property
    def all_problems(self) -> list[str]:
        """Folder-level problems followed by every case's problems."""
        return self.problems + [p for c in self.cases for p in c.problems]

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.all_problems

    @property
    def bad_cases(self) -> list[str]:
        """Ids of the cases with at least one problem, in ``dataset.json`` order."""
        return [c.id for c in self.cases if c.problems]

    def raise_for_problems(self) -> None:
        """Raise one :class:`DataError` naming every bad case and listing every problem (for
        ``beseg train`` before it starts)."""
        if not self.ok:
            probs, bad = self.all_problems, self.bad_cases
            where = f" in {len(bad)} case(s) ({', '.join(bad)})" if bad else ""
            raise DataError(f"{self.root}: {len(probs)} problem(s){where}: " + "; ".join(probs))

    def format_table(self) -> str:
        """Per-case table: id, shape (voxels), spacing (mm), channels, label volumes (mL), status."""
        labels = sorted(k for k in (self.task.labels if self.task else {}) if k != 0)
        head = ["case", "shape", "spacing (mm)", "ch"] + [f"L{k} (mL)" for k in labels] + ["status"]
        rows = [head]
        for c in self.cases:
            rows.append([
                c.id,
                "x".join(map(str, c.shape)) if c.shape else "?",
                "x".join(f"{s:.2f}" for s in c.spacing) if c.spacing else "?",
                str(c.channels) if c.channels is not None else "?",
                *[f"{c.label_volumes[k]:.2f}" if k in c.label_volumes else "?" for k in labels],
                "ok" if not c.problems else f"{len(c.problems)} problem(s)",
            ])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)

    def format_summary(self) -> str:
        """A few lines: counts, shape and spacing ranges, and every problem."""
        lines = [f"task folder: {self.root}"]
        if self.task is not None:
            lines.append(f"task: {self.task.name}; channels: {self.task.num_channels} "
                         f"({', '.join(self.task.modality.values())}); labels: "
                         + ", ".join(f"{k}={v}" for k, v in sorted(self.task.labels.items())))
        good = [c for c in self.cases if c.shape]
        lines.append(f"training cases: {len(self.cases)} ({len(self.cases) - sum(bool(c.problems) for c in self.cases)} ok); "
                     f"test images: {self.test_images}; ignored AppleDouble '._' files: {self.ignored}")
        if good:
            shapes, spacings = np.array([c.shape for c in good]), np.array([c.spacing for c in good])
            lines.append("shape (voxels) min " + "x".join(map(str, shapes.min(0))) + ", max "
                         + "x".join(map(str, shapes.max(0))))
            lines.append("spacing (mm) min " + "x".join(f"{s:.2f}" for s in spacings.min(0)) + ", max "
                         + "x".join(f"{s:.2f}" for s in spacings.max(0)))
        probs = self.all_problems
        lines.append("OK: no problems found" if not probs else f"FAILED: {len(probs)} problem(s):")
        lines += [f"  - {p}" for p in probs]
        return "\n".join(lines)


def _check_image(path: Path, num_channels: int, problems: list[str]) -> NiftiHeader | None:
    """Read an image, append its problems (unreadable, channel count, NaN/Inf); its header or None."""
    try:
        array, header = read_array(path)
    except DataError as err:
        problems.append(str(err))
        return None
    if header.channels != num_channels:
        problems.append(f"{path}: {header.channels} channel(s) but dataset.json 'modality' declares {num_channels}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            n_nan = int(np.isnan(array).sum())
            problems.append(f"{path}: {n_nan} NaN and {int(bad.sum()) - n_nan} Inf voxel(s)")
    return header


def _check_case(rep: CaseReport, image: Path | None, label: Path | None, task: MSDTask,
                affine_tol: float) -> CaseReport:
    """Append the problems of one case's files to ``rep``; a ``None`` path (one that does not
    resolve inside the task folder) is not read."""
    missing = [p for p in (image, label) if p is not None and not p.is_file()]
    rep.problems.extend(f"{p}: file not found (listed in dataset.json)" for p in missing)
    ih = None
    if image is not None and image not in missing:
        ih = _check_image(image, task.num_channels, rep.problems)
        if ih is not None:
            rep.shape, rep.spacing, rep.channels = ih.spatial_shape, ih.spacing, ih.channels
    if label is None or label in missing:
        return rep
    try:
        label_array, lh = read_array(label)
    except DataError as err:
        rep.problems.append(str(err))
        return rep
    if len(lh.shape) != 3:
        rep.problems.append(f"{label}: a label map must be 3D, got shape {lh.shape}")
        return rep
    if ih is not None:
        if lh.spatial_shape != ih.spatial_shape:
            rep.problems.append(f"{label}: shape {lh.spatial_shape} does not match image shape "
                                f"{ih.spatial_shape} of {image.name}")
        elif not np.allclose(lh.affine, ih.affine, atol=affine_tol, rtol=0):
            diff = float(np.abs(lh.affine - ih.affine).max())
            rep.problems.append(f"{label}: affine differs from the image's by up to {diff:.4g} "
                                f"(tolerance {affine_tol:g})")
    values = np.unique(label_array)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            rep.problems.append(f"{label}: NaN or Inf label values")
            values = values[np.isfinite(values)]
        frac = values[values != np.round(values)]
        if frac.size:
            rep.problems.append(f"{label}: non-integer label values, e.g. {', '.join(f'{v:g}' for v in frac[:5])}")
            values = values[values == np.round(values)]
    undeclared = sorted(int(v) for v in values if int(v) not in task.labels)
    if undeclared:
        rep.problems.append(f"{label}: label values {undeclared} are not declared in dataset.json "
                            f"'labels' ({sorted(task.labels)})")
    voxel_ml = float(np.prod(lh.spacing)) / 1000.0
    counts = {int(v): int(n) for v, n in zip(*np.unique(label_array, return_counts=True)) if v == np.round(v)}
    rep.label_volumes = {k: counts.get(k, 0) * voxel_ml for k in task.labels if k != 0}
    return rep


def check_task(root: str | Path, affine_tol: float = AFFINE_TOL, progress: bool | None = None) -> CheckReport:
    """Check every training case and test image of an MSD task folder (``beseg data check``).

    Unlike :func:`load_task`, it reads a ``dataset.json`` with bad entries too, and lists them with the
    problems of every other case.

    Args:
        root: the task folder.
        affine_tol: largest allowed absolute difference between image and label affine entries
            (mm for the translation, mm/voxel for the rest).
        progress: tqdm bar on stderr; ``None`` shows it only on a terminal.

    Returns:
        A :class:`CheckReport`; it never raises for problems in the data, it lists them.
    """
    root = Path(root)
    report = CheckReport(root)
    try:
        parsed = parse_task(root)
    except DataError as err:
        report.problems.append(str(err))
        return report
    task = parsed.task
    report.task, report.root = task, task.root
    report.problems.extend(parsed.problems)
    report.ignored = sum(1 for sub in ("imagesTr", "labelsTr", "imagesTs") if (task.root / sub).is_dir()
                         for p in (task.root / sub).iterdir() if is_apple_double(p))
    return _check_files(report, parsed.entries, affine_tol, progress)


def _check_files(report: CheckReport, entries: list[Case | BadEntry], affine_tol: float,
                 progress: bool | None) -> CheckReport:
    """Read every entry's files and every test image of ``report.task`` into ``report``."""
    task = report.task
    assert task is not None
    disable = None if progress is None else not progress  # None: tqdm decides (a bar on a terminal only)
    for entry in tqdm(entries, desc="checking", unit="case", disable=disable):
        if isinstance(entry, BadEntry):
            # The entry's own problems, then whatever its files that do resolve inside the folder show.
            rep = CaseReport(entry.case, problems=list(entry.problems))
            report.cases.append(_check_case(rep, entry.image, entry.label, task, affine_tol))
        else:
            report.cases.append(_check_case(CaseReport(entry.id), entry.image, entry.label, task, affine_tol))
    for path in task.test:
        report.test_images += 1
        if not path.is_file():
            report.problems.append(f"{path}: file not found (listed in dataset.json 'test')")
            continue
        _check_image(path, task.num_channels, report.problems)
    return report


def _pass_marker(task: MSDTask, cache_dir: str | Path | None) -> Path | None:
    """The file that records a passed check of ``task``: named by every listed file's path, size and
    modification time, so any change to the data (or to ``dataset.json``) checks again. None when a
    file cannot be looked at (the full check then says exactly what is wrong)."""
    import hashlib

    from beseg.data.intensity import default_cache_dir

    root = task.root  # resolved: one key for every spelling of the folder
    try:
        files = [root / "dataset.json", *(p for c in task.training for p in (c.image, c.label)), *task.test]
        h = hashlib.sha1(f"check v2 {root}".encode())  # v2: entries checked one by one
        for path in files:
            st = path.stat()
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return Path(cache_dir or default_cache_dir(root)) / f"check-{h.hexdigest()[:16]}.ok"


def remember_pass(report: CheckReport, cache_dir: str | Path | None = None) -> None:
    """Record a passed :func:`check_task` so that :func:`require_valid_task` does not read every voxel again
    (``beseg data download`` shows the full check, then training starts without repeating it)."""
    marker = _pass_marker(report.task, cache_dir) if report.ok and report.task is not None else None
    if marker is not None:
        try:
            atomic_write_text(marker, "passed\n")
        except OSError:
            pass  # a read-only cache only costs a re-check next time


def require_valid_task(task: MSDTask, cache_dir: str | Path | None = None, progress: bool = False) -> None:
    """Raise unless every file ``task`` lists passes the check; a pass is remembered until a file changes.

    Checking reads every voxel, which takes minutes on Task01; a training run, and each of the
    runs of a comparison, would otherwise repeat it. A pass is recorded in ``cache_dir`` under a
    key made of every listed file's path, size and modification time, so any change to the data
    (or to ``dataset.json``) checks again. Failures are never cached.

    Args:
        task: the loaded task (:func:`beseg.data.load_task`); its cases and test images are checked.
        cache_dir: where passes are recorded (default :func:`beseg.data.default_cache_dir` of the task).
        progress: a progress bar.

    Raises:
        DataError: the folder has problems; the message lists every one, each naming its file.
    """
    marker = _pass_marker(task, cache_dir)
    if marker is not None and marker.is_file():
        return
    report = _check_files(CheckReport(task.root, task), list(task.training), AFFINE_TOL, progress)
    report.raise_for_problems()
    remember_pass(report, cache_dir)


def as_task(data: MSDTask | str | Path, progress: bool = False) -> MSDTask:
    """The task of a library entry point that takes a task or its folder: the task itself, or the folder loaded once.

    For :func:`beseg.engine.trainer.train`, :func:`beseg.engine.evaluate.evaluate` and
    :func:`beseg.experiment.compare.run_compare`, which a user may call with a folder; everything they call
    takes the :class:`MSDTask`. The listed files are not checked here (:func:`require_valid_task` does).

    Args:
        data: the task, or its folder.
        progress: a progress bar while a folder with bad entries is checked in full.

    Raises:
        DataError: as :func:`beseg.data.load_task`; when ``dataset.json`` has bad entries, one error listing
            them with every other case's problems too (:func:`check_task`), so one run names every bad case.
    """
    if isinstance(data, MSDTask):
        return data
    try:
        return load_task(data, check_files=False)
    except DataError:
        report = check_task(data, progress=progress)
        if report.task is not None:  # dataset.json was read: its bad entries, and every other case's problems
            report.raise_for_problems()
        raise
