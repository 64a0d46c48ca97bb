"""Datasets that read the preprocessed store (:mod:`beseg.data.store`): random patches for training,
whole volumes for validation.

Training (:class:`StorePatchDataset`), per sample: choose the patch centre (with probability
``pos / (pos + neg)`` a foreground voxel from the case's stored locations, a class in proportion to
its voxels, so the centre is uniform over the foreground; otherwise any voxel of the stored
volume), open the arrays memory-mapped, copy only the patch, then normalise (when the store holds
raw intensities), flip and shift that patch. No volume is read, copied or scanned, so a sample
costs the same on a 405x405x450 CT as on a phantom, and a process's memory does not grow with the
number of cases.

This is the distribution today's ``RandCropByPosNegLabeld`` chain draws from: its "negative"
centres are meant to lie outside the label, but MONAI's ``map_binary_to_indices`` inverts a uint8
label tensor bitwise (``~1 == 254``), so every voxel counts as background and the negative centres
are uniform over the volume (checked with MONAI 1.6.1; nnU-Net's non-oversampled patches are
likewise random anywhere). ``tests/test_store.py`` checks that both give the same foreground share.

The crop follows ``SpatialPadd`` + ``RandCropByPosNegLabeld``: a volume smaller than the patch is
zero-padded symmetrically, and a centre too close to the border moves inwards so the patch stays
inside the (padded) volume.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from beseg.data.store import Store

__all__ = ["StorePatchDataset", "StoreVolumeDataset", "crop_start", "read_region"]


def crop_start(centre: Sequence[int], shape: Sequence[int], patch: Sequence[int]) -> tuple[int, ...]:
    """First voxel of the patch around ``centre`` in a volume of ``shape``, as MONAI places it after
    symmetric padding to at least ``patch``; negative or beyond ``shape`` where the patch reaches into
    the padding."""
    out = []
    for c, n, p in zip(centre, shape, patch):
        padded = max(n, p)
        before = (padded - n) // 2
        start = min(max(int(c) + before - p // 2, 0), padded - p)
        out.append(start - before)
    return tuple(out)


def read_region(array: np.ndarray, start: Sequence[int], size: Sequence[int],
                transform: Callable[[Any], Any] | None = None,
                flip: Sequence[bool] = (False, False, False)) -> np.ndarray:
    """``array[:, start : start + size]`` of a (C, X, Y, Z) array, zero outside it, flipped on request.

    The region is copied once, straight from the (memory-mapped) array into the result, flips
    included (read through reversed views), so a patch costs one pass over its own voxels.

    Args:
        array: (C, X, Y, Z), typically memory-mapped (only the region is read).
        start, size: the region (voxels); it may reach outside the array.
        transform: applied to the part inside the array before the zero padding (the padding of a
            normalised volume is 0, as after ``SpatialPadd``).
        flip: flip the result along each spatial axis.

    Returns:
        (C, *size) array of ``array``'s dtype (float32 with a transform), writable and contiguous.
    """
    shape = array.shape[1:]
    src = [slice(max(s, 0), min(s + k, n)) for s, k, n in zip(start, size, shape)]
    dst = [slice(a.start - s, a.stop - s) for a, s in zip(src, start)]
    view = array[(slice(None), *src)]
    axes = tuple(i + 1 for i, f in enumerate(flip) if f)
    if axes:
        view = np.flip(view, axes)
        dst = [slice(k - d.stop, k - d.start) if f else d for d, k, f in zip(dst, size, flip)]
    whole = all(d.start == 0 and d.stop == k for d, k in zip(dst, size))
    if transform is not None:
        part = np.asarray(transform(torch.from_numpy(np.array(view))), dtype=np.float32)
        if whole:
            return part
        out = np.zeros((array.shape[0], *size), np.float32)
        out[(slice(None), *dst)] = part
        return out
    if whole:
        return np.array(view)  # always a copy: never a view of the mapped file
    out = np.zeros((array.shape[0], *size), array.dtype)
    out[(slice(None), *dst)] = view
    return out


class StorePatchDataset(Dataset):
    """Random training patches from the store.

    Args:
        store: a prepared :class:`~beseg.data.store.Store` holding every case of ``case_ids``.
        case_ids: the training cases.
        patch: patch size (voxels).
        read_transform: normalisation left for reading time (:meth:`TaskPreset.read_transform`).
        target: stored label patch (1, ...) uint8 -> loss target (:meth:`TaskPreset.training_target`).
        pos, neg: ratio of foreground-centred to randomly centred patches (as today's
            ``RandCropByPosNegLabeld``, see the module docstring).
        num_samples: patches per visit (a list; MONAI's ``list_data_collate`` flattens it).
        flip_prob: probability of flipping each spatial axis.
        shift_offset, shift_prob: random intensity shift in ``[-offset, offset]`` with this probability.

    Items: a list of ``num_samples`` dicts ``{"image": (C, *patch) float32 tensor, "label": (K, *patch)
    float32 tensor}``. :meth:`sample` draws them from a given seed (what
    :class:`beseg.engine.sampling.SeededDataset` calls); ``dataset[i]`` draws a seed from NumPy's global
    generator.
    """

    def __init__(self, store: Store, case_ids: Sequence[str], patch: Sequence[int],
                 read_transform: Callable[[Any], Any] | None, target: Callable[[np.ndarray], np.ndarray],
                 pos: float = 1.0, neg: float = 1.0, num_samples: int = 1, flip_prob: float = 0.5,
                 shift_offset: float = 0.1, shift_prob: float = 1.0) -> None:
        if pos < 0 or neg < 0 or pos + neg == 0:
            raise ValueError(f"pos and neg must be >= 0 and not both 0, got {pos} and {neg}")
        self.store, self.case_ids = store, list(case_ids)
        self.patch = tuple(int(p) for p in patch)
        self.read_transform, self.target = read_transform, target
        self.pos_prob = pos / (pos + neg)
        self.num_samples, self.flip_prob = num_samples, flip_prob
        self.shift_offset, self.shift_prob = shift_offset, shift_prob

    @property
    def data(self) -> list[dict[str, str]]:
        """``[{"id": case}, ...]``, as a MONAI dataset's ``data``."""
        return [{"id": cid} for cid in self.case_ids]

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> list[dict[str, torch.Tensor]]:
        return self.sample(index, int(np.random.randint(0, 2**31 - 1)))

    def sample(self, index: int, seed: int) -> list[dict[str, torch.Tensor]]:
        """The ``num_samples`` patches of case ``index`` for augmentation seed ``seed``."""
        rng = np.random.default_rng(seed)
        cid = self.case_ids[index]
        arrays = self.store.open(cid)
        counts = arrays.properties["label_counts"]
        loc = arrays.locations
        fg_values = [int(v) for v in counts if int(v) != 0 and counts[v] > 0]
        out = []
        shape = arrays.image.shape[1:]
        for _ in range(self.num_samples):
            if fg_values and rng.random() < self.pos_prob:
                # A class in proportion to its voxels, then a stored voxel of it: uniform over the foreground.
                weights = np.array([counts[str(v)] for v in fg_values], dtype=np.float64)
                value = fg_values[rng.choice(len(fg_values), p=weights / weights.sum())]
                rows = loc[loc[:, 0] == value]
                centre = rows[rng.integers(len(rows)), 1:]
            else:
                centre = np.array([rng.integers(n) for n in shape])  # any voxel (see the module docstring)
            start = crop_start(centre, shape, self.patch)
            flip = [bool(rng.random() < self.flip_prob) for _ in range(3)]  # of the patch only, read flipped
            image = read_region(arrays.image, start, self.patch, self.read_transform, flip)
            label = read_region(arrays.label, start, self.patch, flip=flip)
            if rng.random() < self.shift_prob:
                image += np.float32(rng.uniform(-self.shift_offset, self.shift_offset))  # in place: the patch is ours
            out.append({"image": torch.from_numpy(image), "label": torch.from_numpy(np.ascontiguousarray(self.target(label)))})
        del arrays  # unmaps the case: no pages of it stay in this process
        return out



class StoreVolumeDataset(Dataset):
    """Whole validation volumes from the store, exactly as the preset's validation chain makes them.

    Args:
        store: a prepared store holding every case of ``case_ids``.
        case_ids: the cases.
        read_transform: normalisation left for reading time (:meth:`TaskPreset.read_transform`).

    Items: ``{"id": case, "image": (C, X, Y, Z) float32 tensor, "label": (1, X, Y, Z) uint8 tensor}`` on
    the whole resampled grid (the crop undone by zero padding).
    """

    def __init__(self, store: Store, case_ids: Sequence[str], read_transform: Callable[[Any], Any] | None) -> None:
        self.store, self.case_ids, self.read_transform = store, list(case_ids), read_transform

    @property
    def data(self) -> list[dict[str, str]]:
        return [{"id": cid} for cid in self.case_ids]

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cid = self.case_ids[index]
        image, label = self.store.volume(cid)
        tensor = torch.from_numpy(image)
        if self.read_transform is not None:
            tensor = torch.as_tensor(self.read_transform(tensor), dtype=torch.float32)
        return {"id": cid, "image": tensor, "label": torch.from_numpy(label)}
