"""Synthetic MSD-layout task folders: learnable, but with genuinely hard boundaries.

``make_phantom(out, "spleen")`` writes a CT-like single-channel task read exactly like MSD Task09;
``make_phantom(out, "brain")`` a 4-channel MRI-like task with nested labels 1/2/3 read like Task01.
Each case has what makes boundaries hard in the paper's data:

* smooth, randomly deformed organ/tumour shapes (ellipsoids plus low-frequency random fields);
* partial-volume boundaries (soft membership a fraction of a millimetre wide, then a blur);
* noise, a smooth intensity texture and, for MRI, a multiplicative bias field;
* a neighbouring structure of similar intensity touching the organ (a liver-like blob beside the
  spleen; a FLAIR-bright lesion beside the edema), so the boundary there is mostly shape;
* anisotropic voxels (default 0.8 x 0.8 x 2.5 mm) and an LPS-like affine, so loading exercises
  reorientation and resampling to 1 mm.

Everything is drawn from ``numpy.random.default_rng((seed, case_index))``: same seed, same files.
Random fields are built separably from a coarse grid of Gaussian bumps, which keeps the default spleen phantom
(24 + 4 cases of 96 x 96 x 32 voxels) to a few seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from beseg.data.nifti import write_nifti
from beseg.errors import DataError

__all__ = ["PHANTOM_GEOMETRIES", "PhantomConfig", "PhantomGeometry", "ensure_phantom", "make_phantom", "phantom_case"]

PhantomTask = Literal["spleen", "brain"]

#: Bumped whenever the generator changes what it writes, so cached phantoms are regenerated.
PHANTOM_VERSION = 2


@dataclass(frozen=True)
class PhantomConfig:
    """Geometry of a phantom task.

    Attributes:
        task: ``"spleen"`` or ``"brain"``.
        cases: labelled training cases.
        test_cases: unlabelled cases in ``imagesTs/``.
        size: voxels per axis ``(X, Y, Z)``.
        spacing: voxel size (mm); the default is anisotropic like clinical CT.
        seed: base seed.
    """

    task: PhantomTask = "spleen"
    cases: int = 40
    test_cases: int = 4
    size: tuple[int, int, int] = (96, 96, 32)
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5)
    seed: int = 0


class _Grid:
    """Voxel-centre coordinates in mm, centred on the volume."""

    def __init__(self, size: Sequence[int], spacing: Sequence[float]) -> None:
        self.size = tuple(int(s) for s in size)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.size, self.spacing)]
        self.xyz = np.meshgrid(*axes, indexing="ij", sparse=True)
        self.extent = np.asarray(self.size) * self.spacing  # field of view (mm)

    def smooth_field(self, rng: np.random.Generator, coarse_mm: float = 20.0) -> np.ndarray:
        """Random field with unit variance varying over ~``coarse_mm`` (mm).

        A sum of Gaussian bumps on a coarse node grid, evaluated separably (one small matrix per
        axis): about 50x faster than a cubic ``ndimage.zoom`` or blurring full-resolution noise.
        """
        mats = []
        for n_vox, axis in zip(self.size, self.xyz):
            x = axis.ravel()
            nodes = np.arange(x.min() - coarse_mm, x.max() + 2 * coarse_mm, coarse_mm)
            w = np.exp(-0.5 * ((x[:, None] - nodes[None, :]) / coarse_mm) ** 2)
            mats.append(w / np.sqrt((w ** 2).sum(axis=1, keepdims=True)))  # unit variance everywhere
        coarse = rng.standard_normal(tuple(m.shape[1] for m in mats))
        return np.einsum("abc,ia,jb,kc->ijk", coarse, *mats, optimize=True)

    def blob(self, rng: np.random.Generator, centre: np.ndarray, radii: np.ndarray,
             deform: float) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) to a randomly rotated, deformed ellipsoid."""
        rot = _random_rotation(rng)
        rel = [self.xyz[i] - centre[i] for i in range(3)]
        # Rotated coordinates divided by the radii: the ellipsoid is |u| = 1.
        u = [sum(rot[j, i] * rel[i] for i in range(3)) / radii[j] for j in range(3)]
        norm = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        return (norm - 1.0) * radii.mean() + deform * self.smooth_field(rng)


@dataclass(frozen=True)
class PhantomGeometry:
    """A phantom's task and voxel grid, e.g. one like a real archive's."""

    task: PhantomTask
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def describe(self) -> str:
        return (f"{self.task}, {'x'.join(map(str, self.size))} voxels at "
                f"{'x'.join(f'{s:g}' for s in self.spacing)} mm")


#: Phantom grids: the default CPU-sized one, and the real archives' (MSD Task09 spleen CTs: 512x512
#: in-plane at about 0.79 mm, 90 slices of 5 mm, ~405x405x450 at 1 mm; Task01 BraTS MRIs:
#: 240x240x155 at 1 mm, 4 channels), for benchmarks at real sizes.
PHANTOM_GEOMETRIES: dict[str, PhantomGeometry] = {
    "default": PhantomGeometry("spleen", (96, 96, 32), (0.8, 0.8, 2.5)),
    "task09": PhantomGeometry("spleen", (512, 512, 90), (0.79, 0.79, 5.0)),
    "task01": PhantomGeometry("brain", (240, 240, 155), (1.0, 1.0, 1.0)),
}


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _soft(dist: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume membership: 1 inside, 0 outside, a logistic ramp ``width`` mm wide."""
    return 0.5 * (1.0 - np.tanh(dist / width))


def _touching_centre(rng: np.random.Generator, centre: np.ndarray, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Centre for a second blob that touches (slightly overlaps) the first, mostly in-plane."""
    direction = rng.normal(size=3) * np.array([1.0, 1.0, 0.4])
    direction /= np.linalg.norm(direction)
    return centre + direction * 0.85 * (r1.mean() + r2.mean())


def _spleen_case(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    fov = grid.extent
    # Body: an elliptic cylinder with a subcutaneous fat layer; air outside.
    body_r = fov[:2] * rng.uniform(0.44, 0.49, size=2)
    body = np.sqrt((grid.xyz[0] / body_r[0]) ** 2 + (grid.xyz[1] / body_r[1]) ** 2) - 1.0
    body_d = body * body_r.mean() + 1.5 * grid.smooth_field(rng, 30.0)
    r_organ = rng.uniform([11, 8, 14], [17, 12, 22])
    centre = rng.uniform(-0.12, 0.12, size=3) * fov
    organ_d = grid.blob(rng, centre, r_organ, deform=rng.uniform(2.0, 4.0))
    r_nb = rng.uniform([12, 10, 14], [18, 14, 24])
    nb_d = grid.blob(rng, _touching_centre(rng, centre, r_organ, r_nb), r_nb, deform=2.5)

    in_body = _soft(body_d, 0.8)
    fat = in_body * (1.0 - _soft(body_d + rng.uniform(3.0, 6.0), 1.0))
    organ = _soft(organ_d, rng.uniform(0.4, 1.0)) * in_body
    neighbour = _soft(nb_d, 0.8) * (1.0 - organ) * in_body  # the organ wins where they overlap
    tissue = np.clip(in_body - fat - organ - neighbour, 0.0, None)

    hu_organ = rng.uniform(105, 135)
    # "Similar intensity", like liver next to spleen: always a little darker, so the task stays
    # learnable (a sign that flips from case to case would make organ and neighbour
    # indistinguishable), but within about two noise standard deviations of the organ.
    hu_nb = hu_organ - rng.uniform(25, 40)
    image = (-1000.0 * (1.0 - in_body) - 100.0 * fat
             + (40.0 + 15.0 * grid.smooth_field(rng, 12.0)) * tissue
             + (hu_organ + 6.0 * grid.smooth_field(rng, 10.0)) * organ + hu_nb * neighbour)
    # Scanner blur (in-plane and through the 2.5 mm slices), then noise.
    image = ndimage.gaussian_filter(image, sigma=(0.7, 0.7, 0.4), mode="nearest")
    image += rng.normal(0.0, rng.uniform(10, 16), size=image.shape)
    label = ((organ_d < 0) & (body_d < 0)).astype(np.uint8)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


# Mean intensity per tissue in (FLAIR, T1w, T1gd, T2w), arbitrary MRI units.
_MRI = {
    "brain": (100.0, 120.0, 120.0, 90.0),
    "edema": (165.0, 100.0, 105.0, 160.0),
    "necrotic": (140.0, 75.0, 80.0, 185.0),
    "enhancing": (145.0, 105.0, 200.0, 130.0),
    "lesion": (160.0, 110.0, 112.0, 120.0),  # FLAIR-bright like edema, touching it, not tumour
}


def _brain_case(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
    fov = grid.extent
    head_r = fov * np.array([0.45, 0.46, 0.47])
    head_d = grid.blob(rng, np.zeros(3), head_r * rng.uniform(0.95, 1.0, size=3), deform=1.0)
    r_core = rng.uniform(7, 12, size=3)
    centre = rng.uniform(-0.15, 0.15, size=3) * fov
    core_d = grid.blob(rng, centre, r_core, deform=rng.uniform(1.0, 2.0))
    edema_d = core_d - rng.uniform(4.0, 9.0) + 2.0 * grid.smooth_field(rng, 15.0)
    ring = rng.uniform(1.5, 3.0)  # enhancing rim thickness (mm)
    r_les = rng.uniform(5, 9, size=3)
    les_d = grid.blob(rng, _touching_centre(rng, centre, r_core + 6.0, r_les), r_les, deform=1.5)

    head = _soft(head_d, 0.7)
    w = rng.uniform(0.4, 0.9)
    edema_m = _soft(edema_d, w)
    core_m = _soft(core_d, w)
    necrotic_m = _soft(core_d + ring, w)
    parts = {
        "necrotic": necrotic_m,
        "enhancing": core_m - necrotic_m,
        "edema": edema_m - core_m,
        "lesion": _soft(les_d, w) * (1.0 - edema_m),
    }
    parts["brain"] = np.clip(1.0 - sum(parts.values()), 0.0, None)
    texture = grid.smooth_field(rng, 8.0)
    channels = []
    for c in range(4):
        bias = np.exp(0.08 * grid.smooth_field(rng, 40.0))
        img = sum(m * _MRI[k][c] for k, m in parts.items()) * (1.0 + 0.05 * texture) * bias
        img = ndimage.gaussian_filter(img, sigma=(0.6, 0.6, 0.4), mode="nearest")
        img = img + rng.normal(0.0, 7.0, size=img.shape)
        # Skull-stripped MRI: exactly zero outside the head, which the non-zero normalisation relies on.
        channels.append(np.where(head_d < 0, np.clip(img, 1.0, None) * head, 0.0))
    label = np.zeros(grid.size, dtype=np.uint8)
    inside = head_d < 0
    label[(edema_d < 0) & inside] = 1
    label[(core_d < 0) & inside] = 3
    label[(core_d + ring < 0) & inside] = 2
    return np.stack(channels, axis=-1).astype(np.float32), label


_META = {
    "spleen": {"name": "BesegPhantomSpleen", "prefix": "phantom_spleen", "modality": {"0": "CT"},
               "labels": {"0": "background", "1": "spleen"}, "tensorImageSize": "3D"},
    "brain": {"name": "BesegPhantomBrainTumour", "prefix": "phantom_brain",
              "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
              "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
              "tensorImageSize": "4D"},
}


def phantom_case(task: PhantomTask, seed: int, index: int, size: Sequence[int] = (96, 96, 32),
                 spacing: Sequence[float] = (0.8, 0.8, 2.5)) -> tuple[np.ndarray, np.ndarray]:
    """Generate one phantom case in memory.

    Args:
        task: ``"spleen"`` or ``"brain"``.
        seed, index: the case is drawn from ``default_rng((seed, index))``.
        size: voxels ``(X, Y, Z)``.
        spacing: voxel size (mm).

    Returns:
        ``(image, label)``: spleen ``(X, Y, Z)`` int16 HU; brain ``(X, Y, Z, 4)`` float32 (FLAIR,
        T1w, T1gd, T2w); label ``(X, Y, Z)`` uint8 (spleen 0/1; brain 0 background, 1 edema,
        2 non-enhancing/necrotic core, 3 enhancing).
    """
    if task not in _META:
        raise ValueError(f"phantom task must be 'spleen' or 'brain', got {task!r}")
    if len(size) != 3 or min(size) < 8:
        raise ValueError(f"phantom size must be 3 integers >= 8, got {tuple(size)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"phantom spacing must be 3 positive numbers (mm), got {tuple(spacing)}")
    rng = np.random.default_rng((seed, index))
    grid = _Grid(size, spacing)
    return (_spleen_case if task == "spleen" else _brain_case)(rng, grid)


def _affine(size: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    # LPS-like storage (x and y flipped) as in the MSD CT volumes, so Orientationd has work to do.
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [(size[0] - 1) * spacing[0] / 2, (size[1] - 1) * spacing[1] / 2, -(size[2] - 1) * spacing[2] / 2]
    return affine


def make_phantom(out: str | Path, config: PhantomConfig | None = None, progress: bool = True,
                 **overrides) -> Path:
    """Write a phantom task folder in MSD layout.

    Args:
        out: folder to create (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``); it
            may exist but must not already contain a ``dataset.json``.
        config: the :class:`PhantomConfig`; keyword ``overrides`` replace its fields
            (``task=``, ``cases=``, ``seed=``, ``size=`` ...).
        progress: show a tqdm bar.

    Returns:
        The task folder.

    Raises:
        DataError: ``out/dataset.json`` exists (a dataset is never overwritten).
        ValueError: bad task, size, spacing or case counts.
    """
    cfg = PhantomConfig(**{**(config.__dict__ if config else {}), **overrides})
    if cfg.cases < 2 or cfg.test_cases < 0:
        raise ValueError(f"phantom needs at least 2 training cases and >= 0 test cases, got {cfg.cases}/{cfg.test_cases}")
    out = Path(out)
    if (out / "dataset.json").exists():
        raise DataError(f"{out / 'dataset.json'}: already exists; refusing to overwrite a dataset")
    meta = _META.get(cfg.task)
    if meta is None:
        raise ValueError(f"phantom task must be 'spleen' or 'brain', got {cfg.task!r}")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    affine = _affine(cfg.size, cfg.spacing)
    training, test = [], []
    total = cfg.cases + cfg.test_cases
    for i in tqdm(range(total), desc=f"phantom {cfg.task}", unit="case", disable=not progress):
        image, label = phantom_case(cfg.task, cfg.seed, i, cfg.size, cfg.spacing)
        name = f"{meta['prefix']}_{i:03d}.nii.gz"
        if i < cfg.cases:
            write_nifti(out / "imagesTr" / name, image, affine)
            write_nifti(out / "labelsTr" / name, label, affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            write_nifti(out / "imagesTs" / name, image, affine)
            test.append(f"./imagesTs/{name}")
    dataset = {
        "name": meta["name"],
        "description": f"beseg synthetic {cfg.task} phantom (not real patient data)",
        "reference": "generated by `beseg data phantom`",
        "licence": "CC0",
        "tensorImageSize": meta["tensorImageSize"],
        "modality": meta["modality"],
        "labels": meta["labels"],
        "numTraining": cfg.cases,
        "numTest": cfg.test_cases,
        "training": training,
        "test": test,
        "beseg_phantom": {"task": cfg.task, "seed": cfg.seed, "size": list(cfg.size), "spacing": list(cfg.spacing)},
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    return out


def ensure_phantom(task: PhantomTask = "spleen", root: str | Path | None = None, progress: bool = True,
                   **overrides) -> Path:
    """The default phantom folder for ``task``, generated once and reused.

    It lives under ``root`` (default :func:`beseg.data.intensity.cache_base`: ``$BESEG_CACHE`` or ``~/.cache/beseg``) in a folder named
    by task and settings. It is written to a temporary folder and renamed when complete, so an
    interrupted generation is never mistaken for a dataset.

    Returns:
        The task folder (contains ``dataset.json``).
    """
    import hashlib
    import os
    import shutil
    import tempfile

    cfg = PhantomConfig(**{**PhantomConfig().__dict__, "task": task, **overrides})
    from beseg.data.intensity import cache_base

    base = Path(root).expanduser() if root else cache_base()
    key = {**cfg.__dict__, "generator": PHANTOM_VERSION}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:10]
    target = base / f"phantom-{task}-{digest}"
    if (target / "dataset.json").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=base))
    try:
        make_phantom(tmp, cfg, progress=progress)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: use its copy
            if not (target / "dataset.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
