"""Training configuration: dataclasses loaded from YAML (safe loading) and validated.

A config names a task preset, a network and a loss; the six rows of the paper's Table 1 are
presets shipped in ``beseg/configs/`` (``beseg configs`` lists them). A preset is loaded by name
or a YAML file by path; ``key=value`` overrides use dotted keys (``train.epochs=5``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from beseg.errors import ConfigError

__all__ = [
    "Config", "DataConfig", "LossConfig", "LossName", "ModelConfig", "OptimConfig", "TrainConfig",
    "config_from_dict", "config_to_dict", "list_presets", "load_config", "merge_config", "parse_overrides", "RUNTIME_KEYS",
    "with_runtime_settings",
]


@dataclass
class DataConfig:
    """Which task and how it is sampled.

    Attributes:
        task: task preset (``task01``, ``task09``, ``phantom_spleen``, ``phantom_brain``; ``phantom-spleen``
            is read as ``phantom_spleen``).
        patch_size: training patch in voxels at 1 mm; ``None`` takes the preset's.
        batch_size: patches per step per process.
        num_samples: patches drawn per volume per visit.
        pos, neg: ratio of foreground- to background-centred patches.
        val_frac: share of all cases that choose the checkpoint (``best.pt``), at least 1 case;
            default 0.1.
        test_frac: share of all cases held out for testing, at least 1 case when > 0; default
            0.2. The test cases are never trained on nor used to choose a checkpoint; reports are
            computed on them. ``0`` is the paper's two-way protocol (80/20 with ``val_frac=0.2``,
            the paper's 32/9 and 388/96 on the full MSD tasks), whose validation numbers are
            optimistic because the same cases chose ``best.pt``.
        split_seed: seed of a new split.
        split_file: JSON split (see :mod:`beseg.data.splits`); ``None`` uses the cache folder's
            ``split.json``, shared by every run on the same data so that every system is compared
            on the same cases. An existing file wins over the fractions (delete it to re-split);
            a two-way file is refused while ``test_frac > 0``. A run records the file it used here
            (in its ``config.yaml``) and a copy as ``RUN_DIR/split.json``.
        cache: ``store`` (default): the preprocessed, memory-mapped store (:mod:`beseg.data.store`),
            built once per dataset and preprocessing settings and shared by every run and process;
            ``memory`` (every preprocessed volume in every process's RAM: only for small datasets);
            ``none`` (read the NIfTI files for every patch). ``disk`` is the old name of ``store``.
        cache_dir: the dataset's cache folder (store, split, statistics); ``None`` uses
            ``$BESEG_CACHE/<folder name>-<hash of its path>`` (``~/.cache/beseg/...`` without ``BESEG_CACHE``).
        num_workers: DataLoader worker processes.
    """

    task: str = "phantom_spleen"
    patch_size: tuple[int, int, int] | None = None
    batch_size: int = 2
    num_samples: int = 1
    pos: float = 1.0
    neg: float = 1.0
    val_frac: float = 0.1
    test_frac: float = 0.2
    split_seed: int = 0
    split_file: str | None = None
    cache: Literal["store", "memory", "disk", "none"] = "store"
    cache_dir: str | None = None
    num_workers: int = 2

    @property
    def cache_path(self) -> Path | None:
        """``cache_dir`` as a path; ``None`` means the default (:func:`beseg.data.default_cache_dir`)."""
        return Path(self.cache_dir) if self.cache_dir else None


@dataclass
class ModelConfig:
    """Network from MONAI.

    Attributes:
        network: ``segresnet`` (Myronenko 2018: blocks_down 1,2,2,4, blocks_up 1,1,1), ``unet``
            or ``ahnet``.
        init_filters: SegResNet's first-level filters.
        dropout: dropout probability (SegResNet, UNet).
        unet_channels, unet_strides, unet_res_units: UNet's layout.
        ahnet_layers: AHNet's encoder blocks per level.
        ahnet_psp_blocks: AHNet's pyramid-pooling blocks (0-4); block 4 pools 64x64 in-plane at half
            resolution, so patches below 128 voxels in-plane need fewer.
    """

    network: Literal["segresnet", "unet", "ahnet"] = "segresnet"
    init_filters: int = 16
    dropout: float = 0.0
    unet_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    unet_strides: tuple[int, ...] = (2, 2, 2, 2)
    unet_res_units: int = 2
    ahnet_layers: tuple[int, ...] = (3, 4, 6, 3)
    ahnet_psp_blocks: int = 2


#: The names a config's ``loss.name`` may take. :data:`beseg.engine.losses.LOSSES` builds each one (a
#: test keeps the two equal): a new loss is one name here and one entry there. The names live here, with
#: the config types, so that checking a config needs neither torch nor the loss builders (as
#: ``model.network`` and :data:`beseg.engine.networks.NETWORKS`).
LossName = Literal["dice", "dice_be", "dice_boundary", "dice_focal", "dice_ce", "dice_hd"]


@dataclass
class LossConfig:
    """Training loss (a :data:`LossName`, built by :data:`beseg.engine.losses.LOSSES`) and its weights.

    Attributes:
        name: the loss, e.g. ``dice`` or ``dice_be``.
        include_background: keep the background channel of a softmax task in the loss.
        lambda_dice, lambda_be, lambda_boundary, lambda_focal, lambda_ce, lambda_hd: term weights.
        focal_gamma: focusing exponent of the focal term.
        smoothing_passes: box-filter passes before the Laplacian in the BE term (the paper: 3).
        padding: BE filter padding, ``same`` (the paper's) or ``valid`` (the author's code).
        impl: BE implementation, ``fast`` or ``reference`` (the paper's literal convolutions).
    """

    name: str = "dice"
    include_background: bool = False
    lambda_dice: float = 1.0
    lambda_be: float = 1000.0
    lambda_boundary: float = 1.0
    lambda_focal: float = 1.0
    lambda_ce: float = 1.0
    lambda_hd: float = 1.0
    focal_gamma: float = 2.0
    smoothing_passes: int = 3
    padding: str = "same"
    impl: str = "fast"

    def validate(self) -> "LossConfig":
        """Check the section's values; returns ``self``.

        Raises:
            ConfigError: the first invalid value, named by its dotted key (``loss.padding`` ...).
        """
        from beseg.losses.laplacian import check_filter_options

        names = typing.get_args(LossName)
        if self.name not in names:
            raise ConfigError(f"unknown loss.name {self.name!r}; choose one of: {', '.join(names)}.")
        try:  # the BE filter's own checks; their messages start with the option's name
            check_filter_options(self.smoothing_passes, self.padding, self.impl)
        except ValueError as err:
            raise ConfigError(f"loss.{err}") from None
        for f in dataclasses.fields(self):
            if f.name.startswith("lambda_") or f.name == "focal_gamma":
                value = getattr(self, f.name)
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                    raise ConfigError(f"loss.{f.name} must be a finite number >= 0, got {value!r}.")
        return self


@dataclass
class OptimConfig:
    """Optimiser (Adam, as the paper) and the learning-rate schedule (per epoch).

    Attributes:
        name: ``adam`` (the paper's) or ``sgd`` (momentum 0.9; its update is linear in the
            gradient, which makes runs comparable to rounding, e.g. DDP against one process).
    """

    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    schedule: Literal["cosine", "constant", "poly"] = "cosine"


@dataclass
class TrainConfig:
    """The training loop.

    Attributes:
        epochs: training epochs.
        steps_per_epoch: optimiser steps per epoch, the same on any number of processes; ``None`` is
            one pass over the training cases at one process's batch size (see
            :func:`beseg.engine.trainer.steps_per_epoch`).
        val_every: validate every this many epochs (and after the last).
        sw_overlap: sliding-window overlap at validation (small, as in the paper).
        sw_batch_size: windows per forward pass at validation.
        amp: mixed precision on CUDA (ignored on CPU).
        seed: seeds weights, data order and augmentation; the same seed gives the same run.
        on_nonfinite: ``stop`` (end with a clear message, keep the last good checkpoint) or
            ``skip`` (skip that step's update) when a loss is NaN or Inf.
        checkpoint_every: write ``last.pt`` every this many epochs (and after the last).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        threads: torch CPU threads; ``None`` leaves torch's default.
        dist_timeout_s: under torchrun, how long a process waits for the others in any collective
            before it fails (seconds). Failures that raise stop every process at once; this only
            bounds the wait for a process that stops answering. It must cover rank 0's first data
            check (minutes on Task01) while the others wait.
    """

    epochs: int = 100
    steps_per_epoch: int | None = None
    val_every: int = 1
    sw_overlap: float = 0.25
    sw_batch_size: int = 2
    amp: bool = True
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    checkpoint_every: int = 1
    device: str = "auto"
    threads: int | None = None
    dist_timeout_s: float = 1800.0


@dataclass
class Config:
    """A complete training configuration.

    Attributes:
        system: the name reports use for this system (e.g. ``segresnet_be``).
    """

    system: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, known_task: bool = True) -> "Config":
        """Check values that types alone do not; returns ``self``.

        Args:
            known_task: ``data.task`` must be one of beseg's task presets. ``False`` only for the reference
                config of an nnU-Net run on a dataset without a preset: its ``data`` settings make the
                split, and nnU-Net's own plan decides the rest.

        Raises:
            ConfigError: the first invalid value, named by its dotted key.
        """
        positive = {
            "data.batch_size": self.data.batch_size, "data.num_samples": self.data.num_samples,
            "model.init_filters": self.model.init_filters, "train.epochs": self.train.epochs,
            "train.val_every": self.train.val_every, "train.sw_batch_size": self.train.sw_batch_size,
            "train.checkpoint_every": self.train.checkpoint_every,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}.")
        if self.train.steps_per_epoch is not None and self.train.steps_per_epoch < 1:
            raise ConfigError(f"train.steps_per_epoch must be >= 1 or null, got {self.train.steps_per_epoch}.")
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.data.num_workers}.")
        if not 0.0 < self.data.val_frac < 1.0:
            raise ConfigError(f"data.val_frac must be between 0 and 1, got {self.data.val_frac}.")
        if not 0.0 <= self.data.test_frac < 1.0:
            raise ConfigError(f"data.test_frac must be at least 0 and below 1, got {self.data.test_frac}.")
        if self.data.val_frac + self.data.test_frac >= 1.0:
            raise ConfigError(f"data.val_frac + data.test_frac must be below 1 (cases are left to train on), got "
                              f"{self.data.val_frac} + {self.data.test_frac}.")
        if self.data.patch_size is not None and min(self.data.patch_size) < 1:
            raise ConfigError(f"data.patch_size must be positive, got {list(self.data.patch_size)}.")
        if not 0.0 <= self.train.sw_overlap < 1.0:
            raise ConfigError(f"train.sw_overlap must be in [0, 1), got {self.train.sw_overlap}.")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}.")
        if not 0.0 <= self.model.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.model.dropout}.")
        if self.model.network == "segresnet" and self.model.init_filters % 8:
            # SegResNet normalises with 8 groups.
            raise ConfigError(f"model.init_filters must be a multiple of 8 for segresnet, got {self.model.init_filters}.")
        if not 0 <= self.model.ahnet_psp_blocks <= 4:
            raise ConfigError(f"model.ahnet_psp_blocks must be 0 to 4, got {self.model.ahnet_psp_blocks}.")
        self.loss.validate()
        if not self.train.dist_timeout_s > 0:
            raise ConfigError(f"train.dist_timeout_s must be > 0, got {self.train.dist_timeout_s}.")
        if self.train.device not in ("auto", "cpu") and not self.train.device.startswith("cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda[:N], got {self.train.device!r}.")
        from beseg.data.presets import PRESETS, canonical_task

        self.data.task = canonical_task(self.data.task)  # one spelling in every saved config
        if known_task and self.data.task not in PRESETS:
            raise ConfigError(f"unknown data.task {self.data.task!r}; choose one of: {', '.join(PRESETS)}.")
        return self


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass with readable errors


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}.")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} values, got {len(value)}: {list(value)}.")
        return tuple(_check_value(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}.")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}.")  # pragma: no cover


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
        raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


#: Keys every config must set (directly or through its ``base``): what is trained, on what, how.
REQUIRED_KEYS = {
    "data.task": "the task preset, e.g. phantom_spleen or task09",
    "model.network": "the network: segresnet, unet or ahnet",
    "loss.name": "the training loss, e.g. dice or dice_be",
}


def config_from_dict(data: dict, known_task: bool = True) -> Config:
    """Build and validate a :class:`Config` from nested dicts (other missing keys take defaults).

    Args:
        data: the sections.
        known_task: see :meth:`Config.validate`.

    Raises:
        ConfigError: a required key is missing, or a key is unknown, of the wrong type or invalid.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}.")
    for key, meaning in REQUIRED_KEYS.items():
        section, name = key.split(".")
        if not isinstance(data.get(section), dict) or data[section].get(name) is None:
            raise ConfigError(f"the config is missing the required key {key!r} ({meaning}).")
    return _from_dict(Config, data, "").validate(known_task)


#: ``(section, key)`` settings that change where and how a run executes, not what it computes: they may
#: differ between a run and its resumption (another host, GPU or results-folder path).
RUNTIME_KEYS: frozenset[tuple[str, str]] = frozenset({
    ("data", "num_workers"), ("data", "cache"), ("data", "cache_dir"), ("data", "split_file"), ("train", "threads"),
    ("train", "device"), ("train", "checkpoint_every"), ("train", "dist_timeout_s"),
})


def with_runtime_settings(saved: Config, current: Config) -> Config:
    """``saved`` with the :data:`RUNTIME_KEYS` of ``current``: what a resumed run computes stays the saved
    config's, where it runs (device, threads, cache, the split file's present path) is today's."""
    data = config_to_dict(saved)
    now = config_to_dict(current)
    for section, key in RUNTIME_KEYS:
        data[section][key] = now[section][key]
    return config_from_dict(data)


def config_to_dict(config: Config) -> dict:
    """Nested plain dicts and lists, ready for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


# ----------------------------------------------------------------------------------------------
# files, presets and overrides


def _preset_dir() -> Path:
    return Path(str(resources.files("beseg") / "configs"))


def list_presets() -> dict[str, str]:
    """Shipped presets: name -> first comment line of the file."""
    out = {}
    for path in sorted(p for p in _preset_dir().glob("*.yaml") if not p.name.startswith("_")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {getattr(err, 'strerror', None) or err}.") from None
    try:
        # safe_load builds plain data only: a !!python/object tag is an error, never code.
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        if "tag:yaml.org,2002:python/" in str(err):
            raise ConfigError(f"config {path}: refusing a Python object tag (!!python/...){where}; "
                              "configs hold plain data only and are never run as code.") from None
        raise ConfigError(f"config {path} is not valid YAML{where}: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections (data, model, loss, optim, train).")
    return data


def merge_config(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, section by section (nested dicts merged, other values replaced); a new dict."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_config(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_overrides(items: list[str] | None) -> dict:
    """``["train.epochs=5", "loss.name=dice_be"]`` -> nested dict; values are parsed as YAML scalars.

    Raises:
        ConfigError: an item without ``=`` or with an empty key.
    """
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.epochs=5.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}.")
        node[parts[-1]] = value
    return out


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict]:
    """Load a shipped preset by name, or a YAML file by path, then apply overrides.

    A YAML file may start from a preset with ``base: PRESET_NAME``.

    Returns:
        ``(config, raw)``: the validated config and the merged dict it came from.

    Raises:
        ConfigError: no such preset or file, invalid YAML, unknown key, wrong type or value.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist.")
        raw = _read_yaml(path)
    else:
        preset = _preset_dir() / f"{name_or_path}.yaml"
        if not preset.is_file():
            names = list(list_presets())
            close = difflib.get_close_matches(str(name_or_path), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"no config file or preset named {str(name_or_path)!r}; {hint}`beseg configs` lists the presets."
            )
        raw = _read_yaml(preset)
    seen = {str(path)}
    while "base" in raw:
        base = raw.pop("base")
        if not isinstance(base, str) or base in seen:
            raise ConfigError(f"config base {base!r} is not a preset name or forms a cycle.")
        seen.add(base)
        base_file = _preset_dir() / f"{base}.yaml"
        if not base_file.is_file():
            raise ConfigError(f"config base {base!r} is not a shipped preset; `beseg configs` lists them.")
        raw = merge_config(_read_yaml(base_file), raw)
    raw = merge_config(raw, parse_overrides(overrides))
    return config_from_dict(raw), raw
