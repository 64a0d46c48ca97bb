"""Data layer: MSD task folders, splits, the paper's task presets, the folder checker and the phantom.

The public API for the training engine:

* :func:`load_task` -- parse ``dataset.json`` into an :class:`MSDTask` (paths checked, ``._`` files never read),
  once per command: everything below takes the object; :func:`parse_task` collects every bad entry instead of
  raising; :attr:`MSDTask.identity` (:class:`DatasetIdentity`) and :func:`reload_task` let another process load
  the same dataset again, or refuse a changed one.
* :func:`load_or_make_split` / :func:`make_split` / :func:`make_folds` / :func:`load_split` / :func:`save_split`
  -- seeded train/val/test splits (and k-fold splits) as JSON.
* :func:`get_preset` / :func:`preset_for_task` -> :class:`TaskPreset` with ``train_transforms``,
  ``val_transforms``, ``infer_transforms``, ``inverter``, ``out_channels`` and ``activation``.
* :func:`foreground_percentiles` -- the Task09 normalisation range, cached as JSON.
* :func:`build_task_data` -> :class:`TaskData` -- split + stats + cached train/val datasets in one call.
* :func:`prepare_store` / :func:`open_store` -> :class:`Store` -- the preprocessed, memory-mapped copy of a
  dataset that training and validation read (:class:`StorePatchDataset`, :class:`StoreVolumeDataset`).
* :func:`check_task` -> :class:`CheckReport`; :func:`make_phantom` -- the synthetic task folders.
"""

from beseg.data.check import CaseReport, CheckReport, as_task, check_task, require_valid_task
from beseg.data.datasets import TaskData, build_task_data, make_dataset
from beseg.data.intensity import IntensityRange, default_cache_dir, foreground_percentiles
from beseg.data.msd import (
    BadEntry, Case, DatasetChangedError, DatasetIdentity, MSDTask, ParsedTask, case_id, is_apple_double,
    list_nifti, load_task, parse_task, reload_task,
)
from beseg.data.phantom import PhantomConfig, ensure_phantom, make_phantom, phantom_case
from beseg.data.presets import PRESETS, MSDBratsRegionsd, TaskPreset, get_preset, msd_brats_regions, preset_for_task
from beseg.data.patches import StorePatchDataset, StoreVolumeDataset
from beseg.data.store import Store, open_store, prepare_store
from beseg.data.splits import Split, load_or_make_split, load_split, make_folds, make_split, save_split

__all__ = [
    "Case", "CaseReport", "CheckReport", "IntensityRange", "MSDBratsRegionsd", "MSDTask", "PRESETS",
    "PhantomConfig", "Split", "ensure_phantom", "require_valid_task", "TaskData", "TaskPreset", "build_task_data", "case_id", "check_task",
    "default_cache_dir", "foreground_percentiles", "get_preset", "is_apple_double", "list_nifti",
    "load_or_make_split", "load_split", "load_task", "make_dataset", "make_phantom", "msd_brats_regions",
    "phantom_case", "preset_for_task", "save_split", "make_split", "make_folds", "BadEntry", "ParsedTask",
    "parse_task", "reload_task", "as_task", "DatasetIdentity", "DatasetChangedError", "Store", "StorePatchDataset", "StoreVolumeDataset", "open_store", "prepare_store",
]
