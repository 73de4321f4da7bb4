"""``distributor admin drain|undrain|weight|add|remove``: the admin API from a terminal.

``--fleet URL,URL,...`` applies the change to every instance and reports each (``control/fleet.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any

from distributor.config import COMPRESSIONS, MODES


def add_admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default="http://127.0.0.1:9091", help="control plane URL")
    parser.add_argument("--token", default=None, help="bearer token (default: $DISTRIBUTOR_ADMIN_TOKEN)")
    parser.add_argument("--fleet", metavar="URL,URL,...", default=None,
                        help="apply the change to every instance's control plane and report each; exit 1 unless "
                             "it is in effect on all (safe to re-run); replaces --admin")
    parser.add_argument("--json", action="store_true", help="with --fleet: the per-instance outcomes as JSON")
    actions = parser.add_subparsers(dest="action", required=True)
    for action in ("drain", "undrain", "remove"):
        actions.add_parser(action).add_argument("name")
    weight = actions.add_parser("weight", help="change an analyzer's weight live")
    weight.add_argument("name")
    weight.add_argument("weight", type=float)
    add = actions.add_parser("add", help="add an analyzer")
    add.add_argument("name")
    add.add_argument("url")
    add.add_argument("weight", type=float)
    add.add_argument("--mode", choices=MODES, default="batch")
    add.add_argument("--compression", choices=COMPRESSIONS, default="none", help="of the bodies sent to it")


def request_for(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    base = "/admin/analyzers"
    if args.action in ("drain", "undrain"):
        return "POST", f"{base}/{args.name}/{args.action}", None
    if args.action == "remove":
        return "DELETE", f"{base}/{args.name}", None
    if args.action == "weight":
        return "PUT", f"{base}/{args.name}", {"weight": args.weight}
    return "POST", base, {"name": args.name, "url": args.url, "weight": args.weight, "mode": args.mode,
                          "compression": args.compression}


def run_admin(args: argparse.Namespace) -> int:
    if args.fleet:
        from distributor.control.fleet import run_fleet_admin

        return run_fleet_admin(args)
    method, path, body = request_for(args)
    token = args.token if args.token is not None else os.environ.get("DISTRIBUTOR_ADMIN_TOKEN", "")
    request = urllib.request.Request(
        args.admin.rstrip("/") + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"distributor admin {args.action}: HTTP {exc.code}: {exc.read().decode()}")
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"distributor admin {args.action}: cannot reach the control plane at {args.admin}: {exc}")
        return 1
