"""The `fastsae` command: one module per command, above the library (nothing in the library
imports this package). `python -m fastsae.cli` runs it, as does torchrun's `-m fastsae.cli`."""

from __future__ import annotations

import argparse
import os
import sys

from fastsae.cli.browse import add_browse_parser
from fastsae.cli.demo import add_demo_parser
from fastsae.cli.eval import add_eval_parser
from fastsae.cli.tools import add_bench_parser, add_other_parsers
from fastsae.cli.train import add_train_parser


def _backend_env_error() -> str | None:
    """Why FASTSAE_BACKEND is unusable, or None: checked once here so that every command refuses
    a bad value with one line instead of a traceback from deep inside the first op."""
    value = os.environ.get("FASTSAE_BACKEND")
    if not value or not value.strip():
        return None
    from fastsae.ops import dispatch

    try:
        dispatch.requested_backend()
    except ValueError as exc:
        return f"{dispatch.ENV_VAR}={value}: {exc}"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsae", description="Fast sparse autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_train_parser(sub)
    add_browse_parser(sub)
    add_eval_parser(sub)
    add_other_parsers(sub)  # backends, convert, aot
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _backend_env_error()
    if problem:
        print(f"fastsae {args.command}: error: {problem}", file=sys.stderr)
        return 2
    return args.func(args)
