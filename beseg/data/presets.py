"""Task presets: the paper's preprocessing and augmentation for MSD Task01/Task09, as MONAI transforms.

A :class:`TaskPreset` says what the network sees and predicts (channels, activation) and builds the
transform chains:

* ``deterministic_transforms`` -- load NIfTI, channel-first, RAS, resample to 1.0 mm isotropic
  (image bilinear, label nearest), normalise intensities, convert labels. This prefix is what the
  dataset caches (:mod:`beseg.data.datasets`).
* ``train_transforms`` -- the above, then pad to the patch size, sample patches with a
  positive/negative ratio around the label, random flips on each axis and a random intensity shift.
* ``val_transforms`` -- the deterministic part only: whole resampled volumes, labels as label maps.
* ``store_transforms`` / ``read_transform`` / ``training_target`` -- what the preprocessed store
  (:mod:`beseg.data.store`) keeps per case, the normalisation left for reading time, and the patch
  label the loss gets.
* ``infer_transforms`` -- image only, invertible with :meth:`TaskPreset.inverter` so predictions go
  back to the original geometry.

BraTS regions for MSD Task01. MSD relabelled BraTS: 0 background, 1 edema, 2 non-enhancing tumour,
3 enhancing tumour (see the task's ``dataset.json``). beseg therefore uses TC = {2, 3},
WT = {1, 2, 3}, ET = {3}, channels in the order (TC, WT, ET). MONAI's
``ConvertToMultiChannelBasedOnBratsClassesd`` assumes the original BraTS numbering (1 necrotic /
non-enhancing core, 2 edema, 4 or 3 enhancing), so with MSD labels it would put edema into the
tumour core; :class:`MSDBratsRegionsd` implements the MSD mapping instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Literal, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandShiftIntensityd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from beseg.data.classes import ClassSpec
from beseg.data.intensity import IntensityRange
from beseg.data.msd import MSDTask
from beseg.errors import DataError
from beseg_runtime.intensity import NOISE_FLOOR

__all__ = ["BRATS_REGIONS", "MSDBratsRegionsd", "TaskPreset", "PRESETS", "canonical_task", "get_preset", "preset_for_task", "msd_brats_regions"]

Size3 = tuple[int, int, int]

#: The BraTS regions on MSD Task01 labels (1 edema, 2 non-enhancing tumour, 3 enhancing tumour).
BRATS_REGIONS: ClassSpec = (("TC", (2, 3)), ("WT", (1, 2, 3)), ("ET", (3,)))


def msd_brats_regions(label: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """MSD Task01 labels -> overlapping BraTS regions (TC, WT, ET).

    Args:
        label: ``(1, H, W, D)`` or ``(H, W, D)`` integer labels, 0 background, 1 edema,
            2 non-enhancing tumour, 3 enhancing tumour.

    Returns:
        ``(3, H, W, D)`` boolean-valued array of the same kind as ``label`` (uint8): TC = {2, 3},
        WT = {1, 2, 3}, ET = {3}.
    """
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    regions = [(label == 2) | (label == 3), (label >= 1) & (label <= 3), label == 3]
    if isinstance(label, torch.Tensor):
        return torch.stack(regions).to(torch.uint8)
    return np.stack(regions).astype(np.uint8)


class MSDBratsRegionsd(MapTransform):
    """Dictionary transform applying :func:`msd_brats_regions` to ``keys`` (metadata kept)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = msd_brats_regions(d[key])
        return d


class ClearResamplingNoised(MapTransform):
    """Set to exactly 0 the voxels of each channel whose magnitude is at most ``NOISE_FLOOR`` (1e-6) of
    the channel's largest, before the non-zero z-score.

    Linear resampling leaves values like 1e-14 beside an exactly-zero background, in voxels that depend
    on the resampler's rounding (MONAI's float64 grid here, scipy's in ``beseg-predict``); the non-zero
    z-score would count them. This is :func:`beseg_runtime.intensity.clear_resampling_noise` for tensors,
    so the store, validation, ``evaluate``, ``predict`` and the exported runtime share one rule.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key].clone()
            magnitude = image.abs()
            peak = magnitude.reshape(magnitude.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (image.ndim - 1)))
            image[magnitude <= NOISE_FLOOR * peak] = 0
            d[key] = image
        return d


@dataclass(frozen=True)
class TaskPreset:
    """How one task is read, normalised, augmented and predicted.

    Attributes:
        name: the canonical task id (``task01``, ``task09``, ``phantom_brain``, ``phantom_spleen``;
            see :func:`canonical_task`).
        in_channels: image channels the network receives (must equal ``dataset.json`` modality count).
        out_channels: network output channels: 3 sigmoid regions (TC, WT, ET) or 2 softmax classes.
        activation: ``"sigmoid"`` (independent, overlapping regions; the label has ``out_channels``
            channels) or ``"softmax"`` (mutually exclusive classes; the label is ``(1, H, W, D)``
            class indices, one-hot it in the loss).
        normalization: ``"zscore_nonzero"`` (per channel, zero mean / unit variance over non-zero
            voxels) or ``"foreground_percentile"`` (map the training foreground's 5th..95th
            percentiles to 0..1, clipped; needs an :class:`IntensityRange`).
        label_mode: ``"brats_regions"`` (MSD 1/2/3 -> TC/WT/ET) or ``"foreground"`` (labels as is).
        patch_size: default training patch (voxels at ``pixdim``); the paper's for task01/task09.
        channel_names: names of the output channels.
        allowed_labels: label values the task's ``dataset.json`` may declare.
        paper_split: ``(number of cases, validation cases)`` of the paper; used as the default
            validation size when a folder has exactly that many cases.
        pixdim: target voxel spacing (mm).
    """

    name: str
    in_channels: int
    out_channels: int
    activation: Literal["sigmoid", "softmax"]
    normalization: Literal["zscore_nonzero", "foreground_percentile"]
    label_mode: Literal["brats_regions", "foreground"]
    patch_size: Size3
    channel_names: tuple[str, ...]
    allowed_labels: frozenset[int]
    paper_split: tuple[int, int] | None = None
    pixdim: tuple[float, float, float] = (1.0, 1.0, 1.0)
    description: str = field(default="", compare=False)

    @property
    def scored_classes(self) -> ClassSpec:
        """The classes that are scored, as label values of the dataset's label maps.

        BraTS regions: TC = {2, 3}, WT = {1, 2, 3}, ET = {3}; a softmax task: one class per
        foreground channel, ``channel_names[k]`` = label ``k``.
        """
        if self.label_mode == "brats_regions":
            return BRATS_REGIONS
        return tuple((name, (k,)) for k, name in enumerate(self.channel_names) if k > 0)

    @property
    def class_names(self) -> list[str]:
        """Names of the scored classes, in the order of the scored masks (``TC``, ``WT``, ``ET``; ``spleen``)."""
        return [name for name, _ in self.scored_classes]

    def label_map(self, probs: torch.Tensor) -> torch.Tensor:
        """Network output -> label map in the dataset's own label values.

        Validation, evaluation and prediction all turn outputs into labels here, and score the
        masks ``class_masks(label_map, self.scored_classes)``, so all three score the same thing.

        Softmax: the arg-max class. Sigmoid BraTS regions (TC, WT, ET): the nested MSD Task01
        labels, painted outermost first: 1 edema (WT), 2 non-enhancing tumour (TC), 3 enhancing
        tumour (ET). A voxel inside ET therefore counts as TC and WT too, whatever their channels say.

        Args:
            probs: (B, K, ...) probabilities (softmax or sigmoid outputs), K = :attr:`out_channels`;
                for sigmoid outputs a channel is on above 0.5, so 0/1 region masks give back the
                labels they were made from.

        Returns:
            (B, 1, ...) uint8 label map on ``probs``' device.

        Raises:
            ValueError: ``probs`` does not have :attr:`out_channels` channels, or a sigmoid preset
                has no label mapping.
        """
        if probs.ndim < 3 or probs.shape[1] != self.out_channels:
            raise ValueError(f"preset {self.name!r} expects (B, {self.out_channels}, ...) outputs, "
                             f"got shape {tuple(probs.shape)}.")
        if self.activation == "softmax":
            return probs.argmax(dim=1, keepdim=True).to(torch.uint8)
        if self.label_mode != "brats_regions":
            raise ValueError(f"preset {self.name!r}: no label map for sigmoid outputs with label_mode={self.label_mode!r}.")
        tc, wt, et = (probs[:, i : i + 1] > 0.5 for i in range(3))
        labels = torch.zeros_like(tc, dtype=torch.uint8)
        labels[wt] = 1
        labels[tc] = 2
        labels[et] = 3
        return labels

    @property
    def needs_intensity_stats(self) -> bool:
        """True when the transforms need a training-set :class:`IntensityRange`."""
        return self.normalization == "foreground_percentile"

    def default_val_count(self, num_cases: int, val_frac: float = 0.2) -> int | None:
        """The paper's validation size if ``num_cases`` is the paper's dataset size, else ``None``
        (meaning: use ``val_frac``)."""
        if self.paper_split is not None and num_cases == self.paper_split[0] and val_frac == 0.2:
            return self.paper_split[1]
        return None

    def validate(self, task: MSDTask) -> None:
        """Check that ``task`` fits this preset.

        Raises:
            DataError: channel count or declared labels do not match.
        """
        where = task.root / "dataset.json"
        if task.num_channels != self.in_channels:
            raise DataError(f"{where}: preset {self.name!r} expects {self.in_channels} image channel(s), "
                            f"'modality' declares {task.num_channels}")
        extra = sorted(set(task.labels) - self.allowed_labels)
        if extra:
            raise DataError(f"{where}: preset {self.name!r} allows labels {sorted(self.allowed_labels)}, "
                            f"'labels' also declares {extra}")

    # ---- transform chains -------------------------------------------------------------------

    def _normalize(self, stats: IntensityRange | None) -> list:
        if self.normalization == "zscore_nonzero":
            return [ClearResamplingNoised(keys="image"),
                    NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]
        if stats is None:
            raise ValueError(f"preset {self.name!r} needs intensity stats (beseg.data.foreground_percentiles)")
        return [ScaleIntensityRanged(keys="image", a_min=stats.low, a_max=stats.high, b_min=0.0, b_max=1.0,
                                     clip=True)]

    def _geometry(self, keys: Sequence[str], modes: Sequence[str]) -> list:
        return [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS", labels=None),  # None: use the MetaTensor space, the future default
            Spacingd(keys=keys, pixdim=self.pixdim, mode=tuple(modes)),
        ]

    def deterministic_transforms(self, stats: IntensityRange | None = None) -> list:
        """Load, reorient, resample, normalise and convert labels (the cacheable prefix).

        Args:
            stats: required when :attr:`needs_intensity_stats`.

        Returns:
            A list of MONAI transforms producing ``{"image": (C, H, W, D) float32,
            "label": (K, H, W, D) uint8}`` at :attr:`pixdim` spacing in RAS orientation.
        """
        label = [MSDBratsRegionsd(keys="label")] if self.label_mode == "brats_regions" else []
        return [
            *self._geometry(("image", "label"), ("bilinear", "nearest")),
            *self._normalize(stats),
            *label,
            CastToTyped(keys=("image", "label"), dtype=(np.float32, np.uint8)),
        ]

    # ---- the preprocessed store (beseg.data.store) -------------------------------------------

    @property
    def store_normalizes(self) -> bool:
        """True when the normalisation depends on the case alone (per-case z-score), so the store holds
        normalised images; False when it needs training-set statistics (Task09's percentiles), so the
        store holds resampled raw intensities and :meth:`read_transform` scales each read. The store is
        then the same for every split, fold and seed."""
        return self.normalization == "zscore_nonzero"

    @property
    def crop_nonzero(self) -> bool:
        """True when the store may crop a case to its non-zero bounding box: with the non-zero z-score,
        voxels that are zero in every channel stay exactly 0 and never enter the statistics, so the crop
        loses nothing (whole volumes are rebuilt exactly by zero padding)."""
        return self.normalization == "zscore_nonzero"

    def store_transforms(self) -> Compose:
        """What the store keeps per case: ``{"image": path(s), "label": path}`` -> ``{"image": (C, H, W, D)
        float32, "label": (1, H, W, D) uint8}`` at :attr:`pixdim` in RAS, labels as the dataset's values,
        images normalised only when :attr:`store_normalizes`."""
        return Compose([
            *self._geometry(("image", "label"), ("bilinear", "nearest")),
            *(self._normalize(None) if self.store_normalizes else []),
            CastToTyped(keys=("image", "label"), dtype=(np.float32, np.uint8)),
        ])

    def read_transform(self, stats: IntensityRange | None) -> Callable[[np.ndarray], np.ndarray] | None:
        """The normalisation left for reading time (``None`` when the store holds normalised images):
        an array transform applied to a stored patch or volume, the same MONAI transform, hence the same
        numbers, as the cached chain's."""
        if self.store_normalizes:
            return None
        if stats is None:
            raise ValueError(f"preset {self.name!r} needs intensity stats (beseg.data.foreground_percentiles)")
        return ScaleIntensityRange(a_min=stats.low, a_max=stats.high, b_min=0.0, b_max=1.0, clip=True)

    def training_target(self, label: np.ndarray) -> np.ndarray:
        """A stored label patch (1, ...) uint8 -> what the loss gets: (K, ...) float32 (BraTS regions for
        a sigmoid preset, the class indices as they are for a softmax one)."""
        if self.label_mode == "brats_regions":
            label = label[0] if label.ndim == 4 else label
            out = np.empty((3, *label.shape), np.float32)  # TC, WT, ET as msd_brats_regions, straight to float32
            np.greater_equal(label, 2, out=out[0])
            np.not_equal(label, 0, out=out[1])
            np.equal(label, 3, out=out[2])
            out[0] *= label <= 3
            out[1] *= label <= 3
            return out
        return np.asarray(label, dtype=np.float32)

    def train_transforms(self, patch_size: Sequence[int] | None = None, stats: IntensityRange | None = None,
                         pos: float = 1.0, neg: float = 1.0, num_samples: int = 1, flip_prob: float = 0.5,
                         shift_offset: float = 0.1, shift_prob: float = 1.0) -> Compose:
        """Training chain: deterministic prefix, then random patches and augmentation.

        Args:
            patch_size: patch (voxels at :attr:`pixdim`); default :attr:`patch_size`.
            stats: required when :attr:`needs_intensity_stats`.
            pos, neg: ratio of patches centred on foreground vs background (label 0) voxels.
            num_samples: patches drawn per volume per visit (a list; MONAI's DataLoader flattens it).
            flip_prob: probability of flipping each spatial axis independently.
            shift_offset: random intensity shift in [-offset, offset] (normalised units).
            shift_prob: probability of applying the shift.

        Returns:
            ``Compose`` producing ``num_samples`` dicts ``{"image": (C, *patch) float32,
            "label": (K, *patch) float32}`` as plain tensors (no metadata); volumes smaller than the
            patch are zero-padded first.
        """
        patch = tuple(int(s) for s in (patch_size or self.patch_size))
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be 3 positive integers, got {patch_size}")
        keys = ("image", "label")
        return Compose([
            *self.deterministic_transforms(stats),
            SpatialPadd(keys=keys, spatial_size=patch),
            # Background centres are drawn anywhere outside the label (image_key=None): after
            # normalisation "image > 0" is no body mask (Task09 clips everything below the spleen's
            # 5th percentile to 0, z-scored MRI is negative in half the brain).
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch, pos=pos, neg=neg,
                                   num_samples=num_samples, image_key=None),
            *[RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)],
            RandShiftIntensityd(keys="image", offsets=shift_offset, prob=shift_prob),
            CastToTyped(keys="label", dtype=np.float32),
            EnsureTyped(keys=keys, track_meta=False),
        ])

    def val_transforms(self, stats: IntensityRange | None = None) -> Compose:
        """Validation chain: whole volumes, ``{"image": (C, H, W, D) float32, "label": (1, H, W, D)
        uint8}`` at :attr:`pixdim`, the label in the dataset's own values (validation scores
        ``class_masks(label, scored_classes)``, as evaluation does)."""
        return Compose([*self._geometry(("image", "label"), ("bilinear", "nearest")), *self._normalize(stats),
                        CastToTyped(keys=("image", "label"), dtype=(np.float32, np.uint8))])

    def infer_transforms(self, stats: IntensityRange | None = None) -> Compose:
        """Image-only chain for prediction: ``{"image": path}`` -> ``(C, H, W, D)`` float32 MetaTensor.

        Every step is invertible; pass the same object to :meth:`inverter`.
        """
        return Compose([*self.infer_geometry().transforms, *self.infer_intensity(stats).transforms])

    def infer_geometry(self) -> Compose:
        """The invertible part of :meth:`infer_transforms`: load, channel-first, RAS, resample.

        Pass the same object to :meth:`inverter`. An ensemble reads and resamples an image once
        with it, then normalises it with each member's :meth:`infer_intensity`.
        """
        return Compose(self._geometry(("image",), ("bilinear",)))

    def infer_intensity(self, stats: IntensityRange | None = None) -> Compose:
        """The rest of :meth:`infer_transforms`: normalisation (with ``stats``) and float32."""
        return Compose([*self._normalize(stats), CastToTyped(keys="image", dtype=np.float32)])

    def inverter(self, infer: Compose, pred_key: str = "pred", nearest: bool = False) -> Invertd:
        """Transform mapping ``data[pred_key]`` (a ``(K, H, W, D)`` prediction on the preprocessed
        grid) back to the original image's orientation, spacing and shape.

        Args:
            infer: the ``Compose`` returned by :meth:`infer_transforms` that produced ``data["image"]``.
            pred_key: key of the prediction in the data dict.
            nearest: resample with nearest neighbour (for label maps) instead of bilinear (for
                probabilities).
        """
        return Invertd(keys=pred_key, transform=infer, orig_keys="image", nearest_interp=nearest,
                       to_tensor=True)


_TASK01 = TaskPreset(
    name="task01", in_channels=4, out_channels=3, activation="sigmoid", normalization="zscore_nonzero",
    label_mode="brats_regions", patch_size=(224, 224, 128), channel_names=("TC", "WT", "ET"),
    allowed_labels=frozenset({0, 1, 2, 3}), paper_split=(484, 96),
    description="MSD Task01 brain tumour: 4 MRI channels, TC/WT/ET sigmoid regions, 224x224x128 patches",
)
_TASK09 = TaskPreset(
    name="task09", in_channels=1, out_channels=2, activation="softmax", normalization="foreground_percentile",
    label_mode="foreground", patch_size=(96, 96, 96), channel_names=("background", "spleen"),
    allowed_labels=frozenset({0, 1}), paper_split=(41, 9),
    description="MSD Task09 spleen CT: foreground 5-95 percentile scaling, background+spleen softmax, 96^3 patches",
)

#: Registry of presets. The phantom presets read data exactly like the task they imitate and only
#: change the default patch so that training fits a CPU.
PRESETS: dict[str, TaskPreset] = {
    "task01": _TASK01,
    "task09": _TASK09,
    "phantom_brain": replace(_TASK01, name="phantom_brain", patch_size=(64, 64, 64), paper_split=None,
                             description="beseg phantom brain, read like Task01, 64^3 patches"),
    "phantom_spleen": replace(_TASK09, name="phantom_spleen", patch_size=(64, 64, 64), paper_split=None,
                              description="beseg phantom spleen, read like Task09, 64^3 patches"),
}


def canonical_task(name: str) -> str:
    """The one spelling of a task id: lower case with underscores (``Phantom-Spleen`` -> ``phantom_spleen``).

    Task ids are also the prefixes of the config presets (``phantom_spleen_segresnet_be``), so
    this is the only place that converts between spellings; ``phantom-spleen`` is accepted as an
    alias in configs and on the command line.
    """
    return name.strip().lower().replace("-", "_")


def get_preset(name: str) -> TaskPreset:
    """The preset called ``name`` (any spelling :func:`canonical_task` accepts).

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = canonical_task(name)
    if key not in PRESETS:
        raise ValueError(f"unknown task preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


def preset_for_task(task: MSDTask) -> TaskPreset:
    """Guess the preset from ``dataset.json``: phantom names first, then brain/spleen by name/modality.

    Raises:
        DataError: nothing matches; pass a preset name explicitly.
    """
    name = task.name.lower()
    phantom = "phantom" in name
    if "spleen" in name:
        return PRESETS["phantom_spleen" if phantom else "task09"]
    if "brain" in name or task.num_channels == 4:
        return PRESETS["phantom_brain" if phantom else "task01"]
    raise DataError(f"{task.root / 'dataset.json'}: cannot tell the task preset from name {task.name!r}; "
                    f"choose one of {', '.join(PRESETS)}")
