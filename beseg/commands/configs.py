"""``beseg configs``: list the shipped config presets."""

from __future__ import annotations

import argparse



def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from beseg.engine.config import list_presets

    for name, description in list_presets().items():
        print(f"{name:<32} {description}")
    return 0
