"""``beseg data check|download|prepare|phantom``: validate, download and prepare MSD task folders, make phantoms."""

from __future__ import annotations

import argparse

from beseg.commands.common import EXIT_FAILURE



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from beseg.data.download import MSD_ARCHIVES
    from beseg.data.phantom import PHANTOM_GEOMETRIES

    sub = parser.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    check = sub.add_parser(
        "check", help="validate an MSD task folder (or, with --store, its preprocessed store); exits 1 listing every "
                      "problem",
        description="Validate an MSD task folder, listing every problem. With --store and --config (as for `beseg data "
                    "prepare`): check the config's preprocessed store instead, listing stale cases (source changed, "
                    "files truncated), orphaned cases (not in the dataset), temporary files of killed builders and "
                    "locks of gone builders; --fix removes them (cases being built are left alone).")
    check.add_argument("dir", metavar="DIR", help="task folder containing dataset.json")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with --store), e.g. "
                                                                         "data.cache_dir=/scratch/c")
    check.add_argument("--affine-tol", type=float, default=1e-3,
                       help="largest allowed image/label affine difference (mm)")
    check.add_argument("--store", action="store_true", help="check the preprocessed store of --config instead")
    check.add_argument("--config", metavar="CONFIG", help="with --store: the preset name or YAML file whose store")
    check.add_argument("--fix", action="store_true", help="with --store: remove stale and orphaned cases' files, "
                                                          "leftover temporary files and gone builders' locks")
    check.add_argument("--hash", action="store_true", help="with --store: compare every source file by SHA-256 "
                                                           "(default: files up to 8 MB; larger ones by mtime)")
    check.set_defaults(func=_check)
    download = sub.add_parser(
        "download", help="download an MSD task (resumable, MD5-checked, safely unpacked), then check it",
        description="Download the MSD archive of TASK from the public mirror MONAI's DecathlonDataset uses (or "
                    "$BESEG_MSD_MIRROR, or --url), verify its MD5, unpack it safely into DIR/<TaskNN_Name> and run "
                    "`beseg data check` on it. An interrupted download resumes when the same command runs again; "
                    "a folder already in place is not unpacked again. The MSD data are licensed CC-BY-SA 4.0.")
    download.add_argument("task", choices=tuple(MSD_ARCHIVES), metavar="TASK", help=", ".join(
        f"{k} ({a.folder}, about {a.size_gb:g} GB)" for k, a in MSD_ARCHIVES.items()))
    download.add_argument("--to", metavar="DIR", help="folder the task folder goes into (default $BESEG_DATA_DIR, "
                                                      "else $BESEG_CACHE/msd, i.e. ~/.cache/beseg/msd)")
    download.add_argument("--from", dest="source", metavar="FILE.tar",
                          help="a copy of the archive you already have (no network): checked, unpacked, never changed")
    download.add_argument("--url", metavar="URL", help="the archive's URL (a site mirror; default the public mirror, "
                                                       "or $BESEG_MSD_MIRROR/<TaskNN_Name>.tar)")
    download.add_argument("--md5", metavar="SUM", help="the archive's expected MD5 (default: the public archive's)")
    download.add_argument("--keep-archive", action="store_true",
                          help="keep the downloaded .tar after unpacking (default: remove it; the folder holds the same data)")
    download.add_argument("--no-progress", action="store_true", help="no progress bars")
    download.set_defaults(func=_download)
    prepare = sub.add_parser(
        "prepare", help="build the preprocessed, memory-mapped store a config trains from (once per dataset and "
                        "preprocessing settings; shared by every run)",
        description="Resample and store every labelled case of DATA as a config's training reads it, in "
                    "data.cache_dir (default $BESEG_CACHE/<folder>-<hash>). Cases already stored are kept; other "
                    "processes may prepare or train at the same time (each case is built once).")
    prepare.add_argument("dir", metavar="DATA", help="MSD task folder containing dataset.json")
    prepare.add_argument("--config", required=True, metavar="CONFIG", help="preset name or YAML file")
    prepare.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.cache_dir=/scratch/c")
    prepare.add_argument("--workers", type=int, default=1, metavar="N",
                         help="cases built in parallel (each needs about 4 resampled cases of RAM; default 1)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(func=_prepare)
    phantom = sub.add_parser("phantom", help="write a synthetic task folder in MSD layout")
    phantom.add_argument("out", metavar="OUT", help="folder to create")
    phantom.add_argument("--task", choices=("spleen", "brain"), default=None,
                         help="spleen: CT-like, read like Task09; brain: 4-channel MRI-like, read like Task01 "
                              "(default spleen, or the --like task's)")
    phantom.add_argument("--like", choices=tuple(PHANTOM_GEOMETRIES), default=None,
                         help="the real archive's geometry: " + "; ".join(
                             f"{k}: {v.describe()}" for k, v in PHANTOM_GEOMETRIES.items())
                         + " (sets --task, --size and --spacing)")
    phantom.add_argument("--cases", type=int, default=40, help="labelled training cases (default 40)")
    phantom.add_argument("--test-cases", type=int, default=4, help="unlabelled cases in imagesTs/")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    phantom.add_argument("--size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                         help="voxels per axis (default 96 96 32)")
    phantom.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                         help="voxel size in mm (default 0.8 0.8 2.5)")
    phantom.set_defaults(func=_phantom)


def run(args: argparse.Namespace) -> int:
    return args.func(args)


def _check(args: argparse.Namespace) -> int:
    from beseg.errors import ConfigError

    if args.store:
        return _check_store(args)
    given = [name for name, value in (("--config", args.config), ("--fix", args.fix), ("--hash", args.hash),
                                      ("KEY=VALUE", args.overrides)) if value]
    if given:
        raise ConfigError(f"{', '.join(given)} only apply with --store.")
    return _print_check(args.dir, affine_tol=args.affine_tol)


def _print_check(folder, affine_tol: float = 1e-3, progress: bool | None = None, remember: bool = False) -> int:
    """``beseg data check``'s output for ``folder``; the exit code. ``remember``: record a pass, so that
    training does not read every voxel again (:func:`beseg.data.check.require_valid_task`)."""
    from beseg.data.check import check_task, remember_pass

    report = check_task(folder, affine_tol=affine_tol, progress=progress)
    if report.cases:
        print(report.format_table())
        print()
    print(report.format_summary())
    if remember:
        remember_pass(report)
    return 0 if report.ok else EXIT_FAILURE


def _download(args: argparse.Namespace) -> int:
    from beseg.data.download import MSD_ARCHIVES, data_root, install_task

    task_dir = data_root(args.to) / MSD_ARCHIVES[args.task].folder
    progress = not args.no_progress
    result = install_task(args.task, task_dir, url=args.url, md5=args.md5, source=args.source,
                          keep_archive=args.keep_archive, progress=progress)
    if not result.extracted:
        print(f"{result.task_dir} is in place already (unpacked by beseg from the same archive); checking it")
    elif result.archive_kept:
        print(f"unpacked {result.task_dir} (archive kept: {result.archive}); checking it")
    else:
        print(f"unpacked {result.task_dir} (the downloaded archive was removed); checking it")
    return _print_check(result.task_dir, progress=None if progress else False, remember=True)


def _check_store(args: argparse.Namespace) -> int:
    from beseg.data import get_preset, load_task
    from beseg.data.store import open_store, store_root
    from beseg.engine.config import load_config
    from beseg.errors import ConfigError

    if not args.config:
        raise ConfigError("--store needs --config CONFIG: the preset or YAML file whose store to check "
                          "(as for `beseg data prepare`).")
    config, _ = load_config(args.config, args.overrides)
    preset = get_preset(config.data.task)
    task = load_task(args.dir, check_files=False)  # a missing source file makes its case stale, not the check fail
    root = store_root(task, preset, config.data.cache_path)
    if not root.is_dir():
        print(f"store {root}: not prepared yet (nothing to check)")
        return 0
    store = open_store(task, preset, config.data.cache_path, hash_all=args.hash)
    audit = store.audit(task.training)
    for line in audit.lines():
        print(line)
    print(audit.summary())
    if args.fix and audit.problems:
        removed = store.fix(audit, task.training)
        audit = store.audit(task.training)
        print(f"removed {removed} file(s); now: {audit.summary()}")
    elif audit.problems:
        print("run again with --fix to remove them (stale cases are rebuilt by the next `beseg data prepare` or training)")
    return EXIT_FAILURE if audit.problems else 0


def _phantom(args: argparse.Namespace) -> int:
    import time

    from beseg.data.phantom import PHANTOM_GEOMETRIES, make_phantom
    from beseg.errors import ConfigError

    like = PHANTOM_GEOMETRIES[args.like] if args.like else PHANTOM_GEOMETRIES["default"]
    if args.like and args.task not in (None, like.task):
        raise ConfigError(f"--like {args.like} is a {like.task} phantom; drop --task {args.task} or --like.")
    task = args.task or like.task
    size, spacing = tuple(args.size or like.size), tuple(args.spacing or like.spacing)
    start = time.perf_counter()
    out = make_phantom(args.out, task=task, cases=args.cases, test_cases=args.test_cases, seed=args.seed,
                       size=size, spacing=spacing)
    print(f"wrote {task} phantom ({args.cases} training + {args.test_cases} test cases) of "
          f"{'x'.join(map(str, size))} voxels at {'x'.join(f'{s:g}' for s in spacing)} mm to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from beseg.data import get_preset, load_task, require_valid_task
    from beseg.data.store import prepare_store
    from beseg.engine.config import load_config
    from beseg.errors import ConfigError

    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}.")
    config, _ = load_config(args.config, args.overrides)
    preset = get_preset(config.data.task)
    task = load_task(args.dir)
    preset.validate(task)
    cache_dir = config.data.cache_path
    require_valid_task(task, cache_dir, progress=not args.no_progress)
    store = prepare_store(task, preset, cache_dir, workers=args.workers, progress=not args.no_progress)
    size = store.size_bytes()
    print(f"store {store.root}: {len(task.training)} case(s), {size / 1e9:.2f} GB "
          f"({size / max(1, len(task.training)) / 1e6:.1f} MB per case)")
    return 0
