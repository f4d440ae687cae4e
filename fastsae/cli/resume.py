"""`fastsae train --resume`: the flags given with it are checked against the saved run's settings,
read back through the flag table (config -> flags)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastsae.cli.flags import TRAIN_FLAGS, run_flags


def resume_differences(args: argparse.Namespace, folder: Path) -> list[str]:
    """The run flags given with --resume whose values differ from the run saved in `folder`, each
    as '--flag GIVEN (the run's: SAVED)'. A flag the run would have ignored (--k for a ReLU SAE,
    --synthetic-* for file data) never differs, as in a fresh run."""
    from fastsae.config import SAEConfig
    from fastsae.formats import saelens
    from fastsae.training.config import TrainerConfig

    saved = run_flags(SAEConfig.from_dict(saelens.read_cfg(folder)), TrainerConfig.load(folder))
    differences = []
    for flag in TRAIN_FLAGS:
        given = getattr(args, flag.name, None)
        if given is None or flag.name not in saved:
            continue
        was = saved[flag.name]
        if was is None and not flag.none_is_a_value:
            continue  # a flag this run does not use (e.g. --k for a ReLU SAE), ignored as in a fresh run
        if not flag.same(given, was):
            shown = "" if isinstance(given, bool) else f" {given}"
            differences.append(f"{flag.option}{shown} (the run's: {was})")
    return differences
