"""``cellsam-stream weights ...`` subcommands: argument parsing only, the work is in :mod:`.weights`.

:func:`add_weights_commands` registers ``weights fetch`` and ``weights path`` on the CLI's subparsers.
Each parsed namespace carries ``func``; the CLI calls ``args.func(args)`` and exits with its return
value: 0 success, 1 weights not found or download failed (argparse itself exits 2 on usage errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellsam_core import weights
from cellsam_core.errors import CellSAMError

__all__ = ["add_weights_commands"]


def add_weights_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``weights fetch`` and ``weights path`` on ``subparsers`` (from ``add_subparsers()``)."""
    group = subparsers.add_parser(
        "weights",
        help="find or download the official CellSAM weights",
        description="Find or download the official CellSAM weights. Nothing is downloaded unless you "
        "run 'weights fetch'.",
    )
    commands = group.add_subparsers(dest="weights_command", metavar="{fetch,path}", required=True)

    fetch = commands.add_parser(
        "fetch",
        help="download, verify and extract the official weights archive",
        description=f"Download the official weights from users.deepcell.org into the cache "
        f"(~/.deepcell/models/cellsam_v<version>/). The access token is read from ${weights.TOKEN_ENV} "
        f"(not from the command line, where other users could read it); the API URL can be changed "
        f"with ${weights.API_URL_ENV}.",
    )
    fetch.add_argument(
        "--version",
        default=weights.DEFAULT_VERSION,
        help=f"release to fetch (default {weights.DEFAULT_VERSION}; "
        f"known: {', '.join(weights.KNOWN_VERSIONS)})",
    )
    fetch.add_argument("--force", action="store_true", help="download and extract again even if present")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not a TTY)")
    fetch.add_argument(
        "--cache-dir", type=Path, default=None, help="models cache (default ~/.deepcell/models)"
    )
    fetch.set_defaults(func=_run_fetch)

    path = commands.add_parser(
        "path",
        help="print the weights file that would be loaded",
        description=f"Print the weights file that would be loaded: --weights, else ${weights.WEIGHTS_ENV}, "
        "else the cache. Exits 1 with instructions when there is none.",
    )
    path.add_argument("--model", choices=weights.MODEL_NAMES, default="cellsam_general", help="model name")
    path.add_argument("--version", default=None, help=f"release (default {weights.DEFAULT_VERSION})")
    path.add_argument("--weights", type=Path, default=None, help="explicit weights file to check")
    path.add_argument(
        "--cache-dir", type=Path, default=None, help="models cache (default ~/.deepcell/models)"
    )
    path.set_defaults(func=_run_path)


def _run_fetch(args: argparse.Namespace) -> int:
    try:
        folder = weights.fetch_weights(
            version=args.version,
            cache=args.cache_dir,
            progress=False if args.no_progress else None,
            force=args.force,
        )
    except CellSAMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(folder)
    return 0


def _run_path(args: argparse.Namespace) -> int:
    try:
        found = weights.resolve_weights(
            args.weights, model=args.model, version=args.version, cache=args.cache_dir
        )
    except CellSAMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(found)
    return 0
