"""Train/validation datasets for a task folder, with the deterministic preprocessing cached.

Usage (what ``beseg train`` does)::

    task = load_task("Task09_Spleen")
    preset = get_preset("task09")
    data = build_task_data(task, preset, split_file="runs/split.json", cache_dir="/tmp/cache",
                           patch_size=(96, 96, 96))
    loader = monai.data.DataLoader(data.train, batch_size=2, shuffle=True, num_workers=2)
    for batch in loader:  # batch["image"]: (B, C, 96, 96, 96), batch["label"]: (B, K, 96, 96, 96)
        ...

MONAI's ``DataLoader`` (its ``list_data_collate``) is needed when ``num_samples > 1``, because
the patch sampler returns a list of patches per volume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

from monai.data import CacheDataset, Dataset, PersistentDataset

from beseg.data.intensity import IntensityRange, default_cache_dir, foreground_percentiles
from beseg.data.msd import MSDTask
from beseg.data.presets import TaskPreset
from beseg.data.patches import StorePatchDataset, StoreVolumeDataset
from beseg.data.splits import DEFAULT_TEST_FRAC, DEFAULT_VAL_FRAC, Split, load_or_make_split, load_split
from beseg.data.store import Store, prepare_store

__all__ = ["TaskData", "build_task_data", "make_dataset", "CacheMode"]

CacheMode = Literal["store", "memory", "disk", "none"]


@dataclass
class TaskData:
    """Everything the training engine needs for one task folder.

    Attributes:
        task: the parsed folder.
        preset: the preset used.
        split: the train/validation/test case ids (the test cases are in no dataset here: no
            training or selection decision sees them).
        stats: training-set intensity range (``None`` unless the preset needs it).
        train: dataset of random patches (see :meth:`TaskPreset.train_transforms`).
        val: dataset of whole resampled volumes (see :meth:`TaskPreset.val_transforms`).
        cache_dir: the cache folder used.
        store: the preprocessed store both datasets read (``cache="store"``), else ``None``.
        split_file: the split file read or written.
    """

    task: MSDTask
    preset: TaskPreset
    split: Split
    stats: IntensityRange | None
    train: Dataset
    val: Dataset
    cache_dir: Path
    store: Store | None = None
    split_file: Path | None = None

    @property
    def out_channels(self) -> int:
        """Network output channels."""
        return self.preset.out_channels

    @property
    def activation(self) -> str:
        """``"sigmoid"`` or ``"softmax"``."""
        return self.preset.activation


def make_dataset(items: Sequence[dict], transform, cache: CacheMode, cache_dir: Path | None,
                 tag: str, cache_workers: int = 2, progress: bool = False) -> Dataset:
    """Wrap ``items`` in a MONAI dataset that caches ``transform`` up to its first random step.

    Args:
        items: ``{"image": path, "label": path, ...}`` dicts.
        transform: a ``Compose`` (its deterministic prefix is cached).
        cache: ``"memory"`` (CacheDataset: holds every preprocessed volume in every process's RAM; only
            for small datasets), ``"disk"`` (PersistentDataset under ``cache_dir``, whole volumes read
            per patch), or ``"none"``. The store (``"store"``, the default of :func:`build_task_data`)
            is built there, not here.
        cache_dir: required for ``"disk"``.
        tag: names the disk cache subfolder; it must change whenever the deterministic transforms do
            (presets, stats), because PersistentDataset keys its files by the input dict only.
        cache_workers: threads filling the memory cache.
        progress: show MONAI's progress bar while filling the memory cache.
    """
    items = list(items)
    if cache == "memory":
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=cache_workers, progress=progress)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        folder = Path(cache_dir) / "persistent" / tag
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=folder)
    if cache == "none":
        return Dataset(items, transform)
    raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")


def _tag(preset: TaskPreset, stats: IntensityRange | None) -> str:
    blob = json.dumps([preset.name, preset.pixdim, preset.normalization, preset.label_mode,
                       asdict(stats) if stats else None], sort_keys=True, default=str)
    return f"{preset.name}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def build_task_data(task: MSDTask, preset: TaskPreset, split_file: str | Path | None = None,
                    cache_dir: str | Path | None = None, patch_size: Sequence[int] | None = None,
                    cache: CacheMode = "store", val_frac: float = DEFAULT_VAL_FRAC, seed: int = 0,
                    num_samples: int = 1, pos: float = 1.0, neg: float = 1.0,
                    progress: bool = False, test_frac: float | None = None) -> TaskData:
    """Split the task, compute training-set statistics, and build the train and validation datasets.

    The test cases of the split are held out: they are in neither dataset, and the intensity
    statistics come from the training cases alone.

    Args:
        task: from :func:`beseg.data.load_task`.
        preset: from :func:`beseg.data.get_preset` or :func:`beseg.data.preset_for_task`.
        split_file: JSON split to read, or to create if missing (default ``<cache_dir>/split.json``).
        cache_dir: cache folder (intensity stats, disk cache); default
            :func:`beseg.data.default_cache_dir`.
        patch_size: training patch (voxels); default the preset's.
        cache: ``"store"`` (default): both datasets read the preprocessed store
            (:mod:`beseg.data.store`, built here for the train and validation cases if missing, shared
            by every run and process; ``"disk"`` is its old name); ``"memory"`` or ``"none"``: see
            :func:`make_dataset`.
        val_frac, test_frac, seed: for a new split (see :func:`beseg.data.make_split`); with
            ``test_frac=0`` (the paper's two-way protocol) the paper's validation size is used when
            the folder has the paper's number of cases. ``test_frac=None`` takes an existing split
            file as it is (two-way or not) and makes a new one with the default test fraction.
        num_samples, pos, neg: patch sampling, see :meth:`TaskPreset.train_transforms`.
        progress: show progress bars.

    Returns:
        The :class:`TaskData`.

    Raises:
        DataError: the task does not fit the preset, the split file is invalid (or a two-way
            split while ``test_frac > 0``), or the training images cannot be read for the statistics.
    """
    preset.validate(task)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(task.root)
    ids = [c.id for c in task.training]
    paper_val = preset.default_val_count(len(ids), val_frac) if test_frac == 0 else None
    path = Path(split_file) if split_file else cache_dir / "split.json"
    if test_frac is None:
        split = load_split(path, known_ids=ids) if path.exists() else \
            load_or_make_split(path, ids, val_frac=val_frac, seed=seed, test_frac=DEFAULT_TEST_FRAC)
    else:
        split = load_or_make_split(path, ids, val_frac=val_frac, seed=seed, n_val=paper_val, test_frac=test_frac)
    train_cases = [task.case(i) for i in split.train]
    stats = foreground_percentiles(train_cases, cache_dir, progress=progress) \
        if preset.needs_intensity_stats else None
    if cache in ("store", "disk"):  # "disk": the old name of the store (whole-volume files are gone)
        val_cases = [task.case(i) for i in split.val]
        store = prepare_store(task, preset, cache_dir, cases=[*train_cases, *val_cases], progress=progress)
        read = preset.read_transform(stats)
        train = StorePatchDataset(store, split.train, patch_size or preset.patch_size, read, preset.training_target,
                                  pos=pos, neg=neg, num_samples=num_samples)
        return TaskData(task, preset, split, stats, train, StoreVolumeDataset(store, split.val, read), cache_dir, store,
                        path)
    tag = _tag(preset, stats)
    train = make_dataset([c.as_dict() for c in train_cases],
                         preset.train_transforms(patch_size, stats, pos=pos, neg=neg, num_samples=num_samples),
                         cache, cache_dir, f"{tag}-train", progress=progress)
    # Separate disk folders: the cached prefix of the train and val chains differ in the label dtype,
    # and a case may move between them when the split changes.
    val = make_dataset([task.case(i).as_dict() for i in split.val], preset.val_transforms(stats),
                       cache, cache_dir, f"{tag}-val", progress=progress)
    return TaskData(task, preset, split, stats, train, val, cache_dir, split_file=path)
