"""`preftune label serve | import | export | status`: the command line of the labeling store and web app."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

TOKEN_ENV = "PREFTUNE_LABEL_TOKEN"
DEFAULT_PORT = 8765


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the `label` command and its subcommands to the top-level subparsers."""
    label = commands.add_parser("label", help="label preference pairs in a browser (serve, import, export, status)",
                                description="A labeling store (SQLite) and a web app where people judge pairs of "
                                "responses; the judgments export as TRL preference pairs.")
    label_commands = label.add_subparsers(dest="label_command", required=True)

    serve = label_commands.add_parser("serve", help="run the labeling web app",
                                      description="Serve the labeling app. Binding anything but a loopback address "
                                      f"requires an access token (--token or ${TOKEN_ENV}).")
    serve.add_argument("--db", required=True, help="the labeling store (created by `preftune label import`)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    serve.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                       help=f"access token every request must carry (default ${TOKEN_ENV}); e.g. "
                       "python -c 'import secrets; print(secrets.token_urlsafe())'")
    serve.add_argument("--threads", type=int, default=8, help="worker threads (default 8)")
    serve.set_defaults(run=_serve)

    importer = label_commands.add_parser("import", help="import candidates JSONL (from `preftune sample`) into the store",
                                         description="Import candidate responses; every two distinct responses to a "
                                         "prompt become a pair to judge. Importing the same rows again adds nothing.")
    importer.add_argument("--db", required=True, help="the labeling store (created if missing)")
    importer.add_argument("candidates", nargs="+", help="candidates JSON Lines file(s)")
    importer.set_defaults(run=_import)

    export = label_commands.add_parser("export", help="write the judged pairs as TRL JSONL (prompt, chosen, rejected)",
                                       description="Resolve each pair by majority of its judgments and write TRL "
                                       "JSON Lines that `preftune train` reads; ties, both-bad, skips and pairs "
                                       "without a majority are left out and counted; agreement is reported.")
    export.add_argument("--db", required=True, help="the labeling store")
    export.add_argument("--out", required=True, help="output JSON Lines file")
    export.add_argument("--json", action="store_true", help="print the report as JSON")
    export.set_defaults(run=_export)

    status = label_commands.add_parser("status", help="counts of prompts, pairs and judgments")
    status.add_argument("--db", required=True, help="the labeling store")
    status.add_argument("--json", action="store_true", help="print the counts as JSON")
    status.set_defaults(run=_status)


def _serve(args: argparse.Namespace) -> int:
    from preftune.labeling.app import LabelServer

    server = LabelServer(args.db, host=args.host, port=args.port, token=args.token, threads=args.threads)
    login = "/?token=<your token>" if args.token else "/"
    print(f"labeling {args.db} at {server.url}{login}  (Ctrl-C stops)", flush=True)
    server.serve_forever()
    return 0


def _import(args: argparse.Namespace) -> int:
    from preftune.labeling.store import ImportStats, import_candidate_rows, read_candidates_file

    total = ImportStats()
    for path in args.candidates:
        stats = import_candidate_rows(args.db, read_candidates_file(path), source=path)
        for name, value in asdict(stats).items():
            setattr(total, name, getattr(total, name) + value)
    print(f"imported {total.rows} rows: {total.new_prompts} new prompts, {total.new_responses} new responses, "
          f"{total.new_pairs} new pairs ({total.repeated_responses} repeated and {total.empty_responses} empty "
          f"responses not stored) into {args.db}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from preftune.labeling.export import export_pairs

    report = export_pairs(args.db, args.out)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.format())
    return 0


def _status(args: argparse.Namespace) -> int:
    from preftune.labeling.store import opened, store_status

    with opened(args.db) as conn:
        status = store_status(conn)
    if args.json:
        print(json.dumps(asdict(status), indent=2, ensure_ascii=False))
        return 0
    print(f"{args.db} (schema version {status.schema_version}): {status.prompts} prompts, {status.responses} "
          f"responses, {status.pairs} pairs; {status.pairs_judged} pairs judged, {status.pairs_judged_by_several} "
          f"by several annotators")
    print("judgments: " + ", ".join(f"{choice} {count}" for choice, count in status.judgments_by_choice.items())
          + f" ({status.judgments_active} active, {status.judgments_undone} undone)")
    for name, done in status.annotators.items():
        print(f"  {name}: {done} / {status.pairs}")
    return 0
