"""`preftune board`: serve the board over a folder of runs."""

from __future__ import annotations

import argparse
import os

from preftune.board.app import TOKEN_ENV

DEFAULT_PORT = 8766


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the `board` command to the top-level subparsers."""
    board = commands.add_parser(
        "board", help="a local web app: start runs from a form, watch their curves, stop/resume, compare, check data",
        description="Serve the board over the runs in --runs (each run a folder: its config.yaml, log and outputs). "
        f"Binding anything but a loopback address requires an access token (--token or ${TOKEN_ENV}).",
    )
    board.add_argument("--runs", default="runs", help="folder of the board's runs (default ./runs; created if missing)")
    board.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    board.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    board.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"access token every request must carry (default ${TOKEN_ENV})")
    board.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from preftune.board.app import BoardServer

    server = BoardServer(args.runs, host=args.host, port=args.port, token=args.token)
    login = "/?token=<your token>" if args.token else "/"
    print(f"preftune board over {args.runs} at {server.url}{login}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.runs.shutdown()  # a training run gets SIGINT: it saves a checkpoint and ends
    return 0
