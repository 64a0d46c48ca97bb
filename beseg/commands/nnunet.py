"""``beseg nnunet trainer-dir``: where nnU-Net v2 finds beseg's BE trainers."""

from __future__ import annotations

import argparse



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "nnU-Net v2 (>= 2.8) finds the trainers nnUNetTrainerBE, nnUNetTrainerDiceBE, nnUNetTrainerDiceNoBE, "
        "nnUNetTrainerBESpacing, nnUNetTrainerDiceBESpacing and their short schedules (e.g. nnUNetTrainerBE_5epochs) "
        "in the folder named by nnUNet_extTrainer: export nnUNet_extTrainer=$(beseg nnunet trainer-dir)")
    sub = parser.add_subparsers(dest="nnunet_command", required=True, metavar="WHAT")
    trainer_dir = sub.add_parser("trainer-dir", help="print the folder to put in nnUNet_extTrainer")
    trainer_dir.set_defaults(func=_trainer_dir)


def run(args: argparse.Namespace) -> int:
    return args.func(args)


def _trainer_dir(args: argparse.Namespace) -> int:
    from beseg.nnunet import require_nnunet, trainer_dir

    require_nnunet()
    print(trainer_dir())
    return 0
