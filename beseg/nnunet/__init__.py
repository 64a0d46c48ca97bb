"""BE in nnU-Net v2: trainer classes that nnU-Net finds through ``nnUNet_extTrainer``.

nnU-Net v2 (>= 2.8) looks up the trainer named by ``-tr`` first inside its own package, then in
every folder listed in the environment variable ``nnUNet_extTrainer``. :func:`trainer_dir` is
such a folder, shipped inside beseg::

    export nnUNet_extTrainer=$(beseg nnunet trainer-dir)
    nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerBE

Its trainers (``beseg_be_trainers.py``) are the only modules of beseg that import ``nnunetv2``;
the BE term they add (:mod:`beseg.nnunet.loss`) and this module do not, so beseg works without
the optional ``nnunet`` extra.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from beseg.errors import BesegError

__all__ = [
    "INSTALL_HINT", "MIN_NNUNET_VERSION", "SUPPORTED_VERSIONS", "is_supported_version", "nnunet_version",
    "require_nnunet", "trainer_dir",
]

#: The first nnU-Net release that searches ``nnUNet_extTrainer`` (and the upper bound we test against).
MIN_NNUNET_VERSION = (2, 8)
MAX_NNUNET_MAJOR = 2
#: The supported range, for messages.
SUPPORTED_VERSIONS = f">= {'.'.join(map(str, MIN_NNUNET_VERSION))}, < {MAX_NNUNET_MAJOR + 1}"

INSTALL_HINT = (
    'install the extra with a matching torch/torchvision pair, e.g. pip install torch==2.13.0 torchvision==0.28.0 '
    '-e ./runtime -e ".[nnunet]" from the beseg clone (docs/nnunet.md)'
)


def trainer_dir() -> Path:
    """The folder to put in ``nnUNet_extTrainer``: the BE trainer classes for ``nnUNetv2_train -tr``.

    Returns:
        Absolute path of ``beseg/nnunet/trainers``.
    """
    return Path(__file__).resolve().parent / "trainers"


def nnunet_version() -> str | None:
    """The installed ``nnunetv2`` version, read from its package metadata (nothing is imported).

    Returns:
        The version string, or ``None`` when nnunetv2 is not installed.
    """
    try:
        return metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        return None


def is_supported_version(version: str) -> bool:
    """Whether an ``nnunetv2`` version (``"2.8.1"``) is one beseg's trainers support (:data:`SUPPORTED_VERSIONS`)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        return False
    parsed = (int(match.group(1)), int(match.group(2)))
    return parsed >= MIN_NNUNET_VERSION and parsed[0] <= MAX_NNUNET_MAJOR


def require_nnunet() -> str:
    """Check that a supported nnU-Net v2 is installed.

    Returns:
        The installed ``nnunetv2`` version.

    Raises:
        BesegError: nnunetv2 is missing, older than 2.8 (no ``nnUNet_extTrainer``) or 3 and later;
            the message says how to install the supported one.
    """
    version = nnunet_version()
    if version is None:
        raise BesegError(f"nnU-Net v2 (nnunetv2) is not installed; {INSTALL_HINT}.")
    if not is_supported_version(version):
        raise BesegError(
            f"nnunetv2 {version} is installed, but beseg's trainers need nnunetv2 {SUPPORTED_VERSIONS} "
            f"(nnUNet_extTrainer support); {INSTALL_HINT}."
        )
    return version
