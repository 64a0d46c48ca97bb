"""Reader for Medical Segmentation Decathlon task folders (``dataset.json`` + ``imagesTr/`` ...).

Only what ``dataset.json`` lists is data. The macOS ``._*.nii.gz`` AppleDouble files that ship
inside the real MSD archives are never read: they are skipped when a folder is listed, and an
entry of ``dataset.json`` that names one is an error. Every listed path must resolve inside the
task folder (no absolute paths, no ``..`` or symlink that leads out of it).

Two entry points. :func:`parse_task` reads the file and collects what is wrong with each
``training``/``test`` entry (a path that leaves the folder, a duplicate, a missing key) without
stopping, so ``beseg data check`` can list every bad case in one run; only a file that cannot be
read as a task at all (no folder, invalid JSON, a required key missing or of the wrong type)
raises. :func:`load_task` raises one :class:`beseg.errors.DataError` listing every problem.
The parser raises nothing but ``DataError``, whatever the file contains.

One object per command. A command loads its task once (:func:`load_task`; the library's entry points
that also take a folder, through :func:`beseg.data.check.as_task`) and hands the :class:`MSDTask` down: splits, data
check, training, evaluation, cost plan, nnU-Net preparation and report all read that object, never
``dataset.json`` again. The task knows where it came from (:attr:`MSDTask.identity`: the folder, the
SHA-256 of the ``dataset.json`` bytes it was parsed from, its training ids and test images); a
process that must load the folder again (a comparison's worker) loads it with :func:`reload_task`,
which refuses a dataset that is no longer the one recorded. A new dataset format is a new loader
returning an :class:`MSDTask` with the same identity; nothing below the loaders reads the files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from beseg.errors import DataError

__all__ = ["BadEntry", "Case", "DatasetChangedError", "DatasetIdentity", "MSDTask", "ParsedTask", "load_task", "parse_task", "reload_task", "is_apple_double", "list_nifti", "case_id"]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_apple_double(path: str | Path) -> bool:
    """True for macOS AppleDouble metadata files (``._name``), which are not images."""
    return PurePosixPath(str(path)).name.startswith("._")


def case_id(path: str | Path) -> str:
    """The case name of an image or label file: ``imagesTr/spleen_2.nii.gz`` -> ``spleen_2``."""
    name = PurePosixPath(str(path)).name
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_nifti(folder: str | Path) -> list[Path]:
    """NIfTI files in ``folder``, sorted, without AppleDouble ``._`` files; [] if it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith(_NIFTI_SUFFIXES) and not is_apple_double(p) and p.is_file())


@dataclass(frozen=True)
class Case:
    """One training case.

    Attributes:
        id: case name derived from the image file name (``spleen_2``).
        image: absolute path of the image (3D, or 4D channel-last for multi-channel tasks).
        label: absolute path of the label map (3D integer labels).
    """

    id: str
    image: Path
    label: Path

    def as_dict(self) -> dict[str, str]:
        """The ``{"image": ..., "label": ...}`` dict that MONAI dictionary transforms consume."""
        return {"image": str(self.image), "label": str(self.label), "id": self.id}


def _few(ids: Sequence[str], at_most: int = 3) -> str:
    """``a, b, c and 4 more``: a few names of a longer list, for one-line messages."""
    shown = ", ".join(ids[:at_most])
    return shown + (f" and {len(ids) - at_most} more" if len(ids) > at_most else "")


def _changed_list(before: Sequence[str], after: Sequence[str], what: str) -> str | None:
    """``41 -> 42 training cases (added spleen_50)``; ``None`` when the lists are equal."""
    if tuple(before) == tuple(after):
        return None
    added = [x for x in after if x not in set(before)]
    removed = [x for x in before if x not in set(after)]
    details = [f"added {_few(added)}"] if added else []
    details += [f"removed {_few(removed)}"] if removed else []
    return f"{len(before)} -> {len(after)} {what} ({'; '.join(details) or 'reordered'})"


@dataclass(frozen=True)
class DatasetIdentity:
    """Which dataset a task is: what ``plan.json`` records (its ``data``) so that a process loading the folder
    again can tell whether it is still the dataset the comparison was planned on.

    Attributes:
        folder: the task folder (resolved).
        sha256: SHA-256 (hex) of the ``dataset.json`` bytes the task was parsed from, taken when they were read.
        training: the training case ids, in ``dataset.json`` order.
        test: the test images, relative to the folder (``imagesTs/spleen_1.nii.gz``).
    """

    folder: Path
    sha256: str
    training: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """``{"folder", "dataset_json_sha256", "training", "test"}``, as ``plan.json`` holds it."""
        return {"folder": str(self.folder), "dataset_json_sha256": self.sha256, "training": list(self.training),
                "test": list(self.test)}

    @classmethod
    def from_dict(cls, value: Any) -> DatasetIdentity:
        """The identity :meth:`to_dict` wrote.

        Raises:
            ValueError: ``value`` is not such a dict (a damaged file).
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"'data' must be an object, got {type(value).__name__}")
        folder, digest = value.get("folder"), value.get("dataset_json_sha256")
        training, test = value.get("training"), value.get("test")
        if not isinstance(folder, str) or not folder or not isinstance(digest, str) or not (
                isinstance(training, list) and isinstance(test, list)
                and all(isinstance(x, str) for x in [*training, *test])):
            raise ValueError("'data' must hold a folder, a dataset_json_sha256 and the training and test lists")
        return cls(Path(folder), digest, tuple(training), tuple(test))

    def changes(self, now: DatasetIdentity) -> str | None:
        """What differs in ``now`` from this identity, in one phrase; ``None`` when nothing does.

        ``Task09_Spleen/dataset.json: 41 -> 42 training cases (added spleen_50), SHA-256 3f2a9c01b7e4... ->
        9d04c2e8a1f3...``; a change that keeps the case lists (a label path, another key) says so.
        """
        if now == self:
            return None
        parts = [p for p in (_changed_list(self.training, now.training, "training cases"),
                             _changed_list(self.test, now.test, "test images")) if p]
        if now.folder != self.folder:
            parts.insert(0, f"folder {self.folder} -> {now.folder}")
        if not parts:
            parts.append("the same cases, other content (a path, a label or another key)")
        return (f"{self.folder.name}/dataset.json: {', '.join(parts)}, SHA-256 {self.sha256[:12]}... -> "
                f"{now.sha256[:12]}...")


class DatasetChangedError(DataError):
    """The task folder no longer holds the dataset an identity recorded (:func:`reload_task`).

    Attributes:
        change: what differs (:meth:`DatasetIdentity.changes`).
    """

    def __init__(self, message: str, change: str) -> None:
        super().__init__(message)
        self.change = change


@dataclass(frozen=True)
class MSDTask:
    """A parsed MSD task folder: the one object a command loads and hands down.

    Attributes:
        root: the task folder (resolved).
        name: ``dataset.json`` ``name``, e.g. ``"Spleen"``.
        modality: channel index -> modality name, e.g. ``{0: "CT"}``.
        labels: label value -> name, e.g. ``{0: "background", 1: "spleen"}``.
        training: the labelled cases, in ``dataset.json`` order.
        test: unlabelled test images.
        sha256: SHA-256 (hex) of the ``dataset.json`` bytes this task was parsed from.
        meta: the whole ``dataset.json`` object as parsed (``description``, ``licence``... too), for a tool
            that takes the file's other keys on (nnU-Net's converter); read it, never change it.
    """

    root: Path
    name: str
    modality: dict[int, str]
    labels: dict[int, str]
    training: list[Case] = field(default_factory=list)
    test: list[Path] = field(default_factory=list)
    sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_channels(self) -> int:
        """Number of image channels declared by ``modality``."""
        return len(self.modality)

    @property
    def identity(self) -> DatasetIdentity:
        """The folder, the ``dataset.json`` SHA-256 and the case list (:class:`DatasetIdentity`)."""
        return DatasetIdentity(self.root, self.sha256, tuple(c.id for c in self.training),
                               tuple(p.relative_to(self.root).as_posix() for p in self.test))

    def case(self, cid: str) -> Case:
        """The training case called ``cid``.

        Raises:
            DataError: no such case.
        """
        for c in self.training:
            if c.id == cid:
                return c
        raise DataError(f"{self.root / 'dataset.json'}: no training case named {cid!r}")


def _resolve(root: Path, rel: Any, where: str) -> Path:
    """Resolve a ``dataset.json`` path against the task folder, refusing anything outside it."""
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"{where}: expected a relative file path string, got {rel!r}")
    if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{where}: absolute path {rel!r} is not allowed; paths must be relative to the task folder")
    if is_apple_double(rel):
        raise DataError(f"{where}: {rel!r} is a macOS AppleDouble '._' file, not an image")
    if "\x00" in rel:
        raise DataError(f"{where}: path {rel!r} contains a NUL character")
    # resolve() follows symlinks, so a link inside the folder that points outside is caught too.
    try:
        path = (root / rel).resolve()
        path.is_file()  # a stat: a name too long for the file system fails here, not in a later check
    except (OSError, RuntimeError) as err:  # a name too long for the file system, a symlink loop
        raise DataError(f"{where}: path {rel!r} cannot be resolved ({getattr(err, 'strerror', None) or err})") from None
    if not path.is_relative_to(root):
        raise DataError(f"{where}: path {rel!r} resolves to {path}, outside the task folder {root}")
    return path


def _expect(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing required key {key!r}")
    value = obj[key]
    # bool is an int subclass; a JSON true is never a count.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: key {key!r} must be {names}, got {type(value).__name__}")
    return value


def _int_keyed(mapping: dict, key: str, where: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for k, v in mapping.items():
        try:
            idx = int(k)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {key!r} key {k!r} is not an integer") from None
        if not isinstance(v, str):
            raise DataError(f"{where}: {key!r}[{k!r}] must be a name string, got {type(v).__name__}")
        out[idx] = v
    return out


@dataclass(frozen=True)
class BadEntry:
    """A ``training`` entry of ``dataset.json`` that cannot be used as a case.

    Attributes:
        where: the entry, ``training[3]``.
        case: the case id from its image path when there is one (``spleen_3``), else ``where``.
        problems: one message per problem, each naming ``dataset.json`` and the entry.
        image: the image path if it resolved inside the task folder (it may still be missing), else ``None``.
        label: the same for the label.
    """

    where: str
    case: str
    problems: tuple[str, ...]
    image: Path | None = None
    label: Path | None = None


@dataclass
class ParsedTask:
    """What :func:`parse_task` found.

    Attributes:
        task: the task, with the usable training cases only.
        entries: every ``training`` entry in file order: a :class:`Case` or a :class:`BadEntry`.
        problems: problems of the file itself and of its ``test`` entries (``numTraining``
            disagreeing with ``training``, a ``test`` path leaving the folder...).
        test_index: for each path in ``task.test``, its index in ``dataset.json``'s ``test``.
    """

    task: MSDTask
    entries: list[Case | BadEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    test_index: list[int] = field(default_factory=list)

    @property
    def bad_entries(self) -> list[BadEntry]:
        """The training entries that are not usable cases."""
        return [e for e in self.entries if isinstance(e, BadEntry)]

    @property
    def all_problems(self) -> list[str]:
        """File-level problems, then every bad entry's."""
        return [*self.problems, *(p for e in self.bad_entries for p in e.problems)]


def _read_meta(root: Path, where: str) -> tuple[dict, str]:
    """``dataset.json`` as a dict, and the SHA-256 of the bytes it was parsed from: the one read of the file."""
    try:
        raw = (root / "dataset.json").read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{where}: file not found; an MSD task folder must contain dataset.json") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: cannot read ({err})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except RecursionError:  # a few thousand nested brackets
        raise DataError(f"{where}: invalid JSON: nested too deeply") from None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: top level must be a JSON object, got {type(meta).__name__}")
    return meta, hashlib.sha256(raw).hexdigest()


def _training_entry(root: Path, entry: Any, ewhere: str, seen: dict[str, str]) -> Case | BadEntry:
    """One ``training`` entry as a case, or everything that is wrong with it."""
    if not isinstance(entry, dict):
        return BadEntry(ewhere, ewhere, (f"{ewhere} must be an object with 'image' and 'label', got "
                                         f"{type(entry).__name__}",))
    problems: list[str] = []
    paths: dict[str, Path | None] = {}
    for key in ("image", "label"):
        try:
            paths[key] = _resolve(root, _expect(entry, key, str, ewhere), ewhere)
        except DataError as err:
            problems.append(str(err))
            paths[key] = None
    rel = entry.get("image")
    cid = case_id(rel) if isinstance(rel, str) and rel.strip() else ewhere
    if cid != ewhere:
        if cid in seen:
            problems.append(f"{ewhere}: case {cid!r} is listed twice (also {seen[cid]})")
        else:
            seen[cid] = ewhere.rsplit(": ", 1)[-1]
    if problems:
        return BadEntry(ewhere.rsplit(": ", 1)[-1], cid, tuple(problems), paths["image"], paths["label"])
    return Case(cid, paths["image"], paths["label"])


def parse_task(root: str | Path) -> ParsedTask:
    """Parse ``root/dataset.json``, collecting the problems of every entry instead of stopping at one.

    Args:
        root: the task folder, e.g. ``Task09_Spleen``.

    Returns:
        A :class:`ParsedTask`; its ``task`` holds the usable cases (absolute paths inside the
        folder), its ``entries`` every training entry, and nothing is read but ``dataset.json``.

    Raises:
        DataError: the folder or ``dataset.json`` is missing or not valid JSON, or a required key
            (``name``, ``modality``, ``labels``, ``training``) is missing or of the wrong type.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: task folder not found")
    root = root.resolve()
    where = str(root / "dataset.json")
    meta, digest = _read_meta(root, where)

    name = _expect(meta, "name", str, where)
    modality = _int_keyed(_expect(meta, "modality", dict, where), "modality", where)
    labels = _int_keyed(_expect(meta, "labels", dict, where), "labels", where)
    if not modality:
        raise DataError(f"{where}: 'modality' is empty; it must name at least one channel")
    if sorted(modality) != list(range(len(modality))):
        raise DataError(f"{where}: 'modality' keys must be 0..{len(modality) - 1}, got {sorted(modality)}")
    if 0 not in labels:
        raise DataError(f"{where}: 'labels' must declare 0 (background), got {sorted(labels)}")
    raw_entries = _expect(meta, "training", list, where)

    seen: dict[str, str] = {}
    entries = [_training_entry(root, entry, f"{where}: training[{i}]", seen) for i, entry in enumerate(raw_entries)]
    problems: list[str] = []
    if "numTraining" in meta:
        try:
            num = _expect(meta, "numTraining", int, where)
        except DataError as err:
            problems.append(str(err))
        else:
            if num != len(raw_entries):
                problems.append(f"{where}: numTraining is {num} but 'training' lists {len(raw_entries)} cases")

    test: list[Path] = []
    test_index: list[int] = []
    test_entries = meta.get("test", [])
    if not isinstance(test_entries, list):
        problems.append(f"{where}: key 'test' must be list, got {type(test_entries).__name__}")
        test_entries = []
    for i, entry in enumerate(test_entries):
        # Some MSD variants list test cases as {"image": ...} objects instead of strings.
        rel = entry.get("image") if isinstance(entry, dict) else entry
        try:
            test.append(_resolve(root, rel, f"{where}: test[{i}]"))
            test_index.append(i)
        except DataError as err:
            problems.append(str(err))

    task = MSDTask(root, name, modality, labels, [e for e in entries if isinstance(e, Case)], test, digest, meta)
    return ParsedTask(task, entries, problems, test_index)


def _missing_files(parsed: ParsedTask) -> str | None:
    """One problem naming every listed file that does not exist, with its entry; ``None`` if none."""
    task = parsed.task
    missing = []
    for i, entry in enumerate(parsed.entries):
        if isinstance(entry, Case):
            missing += [(p, f"training[{i}] {k}") for k, p in (("image", entry.image), ("label", entry.label))
                        if not p.is_file()]
    missing += [(p, f"test[{i}]") for i, p in zip(parsed.test_index, task.test) if not p.is_file()]
    if not missing:
        return None
    listed = ", ".join(f"{p.relative_to(task.root)} ({what})" for p, what in missing)
    return f"{task.root / 'dataset.json'}: {len(missing)} listed file(s) missing: {listed}"


def load_task(root: str | Path, check_files: bool = True) -> MSDTask:
    """Parse ``root/dataset.json`` into an :class:`MSDTask`, refusing a file with any problem.

    Args:
        root: the task folder, e.g. ``Task09_Spleen``.
        check_files: also verify that every listed image and label exists; all missing files are
            reported together in one error.

    Returns:
        The parsed task, with absolute paths.

    Raises:
        DataError: one error listing every problem: the folder or ``dataset.json`` is missing or
            invalid JSON; a required key (``name``, ``modality``, ``labels``, ``training``) is
            missing or of the wrong type; ``numTraining`` disagrees with ``training``; a path is
            absolute, escapes the folder or names a ``._`` file; a case is listed twice; or
            (``check_files``) files are missing.
    """
    parsed = parse_task(root)
    problems = parsed.all_problems
    if check_files and (missing := _missing_files(parsed)):
        problems.append(missing)
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        where = str(parsed.task.root / "dataset.json")
        raise DataError(f"{where}: {len(problems)} problems: "
                        + "; ".join(p.removeprefix(f"{where}: ") for p in problems))
    return parsed.task


def reload_task(identity: DatasetIdentity) -> MSDTask:
    """Load the task folder an identity names again, refusing it unless it is still that dataset.

    For a process that was handed the identity instead of the task (a comparison's worker reads it from
    ``plan.json``). The listed files are not checked (the data check does that, with its cache).

    Raises:
        DatasetChangedError: ``dataset.json`` differs from the recorded one (its bytes, its cases); the
            message says what changed (:meth:`DatasetIdentity.changes`).
        DataError: the folder or its ``dataset.json`` cannot be read as a task any more.
    """
    task = load_task(identity.folder, check_files=False)
    change = identity.changes(task.identity)
    if change is not None:
        raise DatasetChangedError(change, change)
    return task
