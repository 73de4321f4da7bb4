"""``distributor wal inspect|verify DIR``: what a write-ahead log directory holds, and whether it is damaged.

Both only read (safe on a running distributor's directory). ``verify`` exits 1
when it finds corruption, so it fits a pre-start hook or a cron check.
"""

from __future__ import annotations

import argparse
import json

from distributor.wal.inspect import inspect, render, verify


def add_wal_flags(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("inspect", help="per worker: segments, bytes, unacknowledged packets, oldest age, damage")
    show.add_argument("dir", help="wal.dir (or one worker-<slot> directory in it)")
    show.add_argument("--json", action="store_true", help="the report as JSON")
    check = actions.add_parser("verify", help="list corruption; exit 1 if there is any")
    check.add_argument("dir", help="wal.dir (or one worker-<slot> directory in it)")


def run_wal(args: argparse.Namespace) -> int:
    if args.action == "inspect":
        report = inspect(args.dir)
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 0
    problems = verify(args.dir)
    for problem in problems:
        print(problem)
    print(f"write-ahead log {args.dir}: " + (f"{len(problems)} problems" if problems else "clean"))
    return 1 if problems else 0
