"""``distributor status``: the control plane's worker and analyzer views for a terminal.

``--fleet URL,URL,...`` sums every instance's views into one (``control/fleet.py``).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
from typing import Any

from distributor.control.client import http_json

MIB = 1 << 20


def add_status_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default="http://127.0.0.1:9091", help="control plane URL")
    parser.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="print the raw JSON views")
    parser.add_argument("--fleet", metavar="URL,URL,...", default=None,
                        help="several instances' control planes: one view summed over the fleet, naming any "
                             "instance that did not answer (exit 1 then); replaces --admin")


def fetch(admin: str) -> dict[str, Any]:
    return {
        "workers": http_json(admin.rstrip("/") + "/admin/workers")[1]["workers"],
        "analyzers": http_json(admin.rstrip("/") + "/admin/analyzers")[1]["analyzers"],
    }


def render(view: dict[str, Any]) -> str:
    lines = [f"{'worker':<7}{'pid':>8} {'state':<9}{'uptime':>8}{'restarts':>9}{'rss MB':>8}{'uss MB':>8}"
             f"{'cpu%':>6}{'fds':>5}{'lag ms':>8}{'conns':>7}{'queued':>8}{'queued MB':>10}{'shed':>7}{'429':>7}"]
    for w in view["workers"]:
        lines.append(
            f"{w['slot']:<7}{w['pid'] or '-':>8} {w['state']:<9}{w['uptime_s']:>7.0f}s{w['restarts']:>9}"
            f"{w.get('rss_bytes', 0) / MIB:>8.1f}{w.get('uss_bytes', 0) / MIB:>8.1f}{w.get('cpu_percent', 0):>6.0f}"
            f"{w.get('open_fds', 0):>5}{w['event_loop_lag_s'] * 1e3:>8.1f}{w['connections']:>7}"
            f"{w['queued_packets']:>8}{w['queued_bytes'] / MIB:>10.1f}{w['shed_packets']:>7}{w['rate_limited_packets']:>7}"
        )
    lines.append("")
    lines.append(f"{'analyzer':<12}{'state':<10}{'weight':>7}{'eff':>6}{'target':>8}{'actual':>8}{'routed msgs':>13}"
                 f"{'delivered':>11}{'queue':>7}{'failed':>8}{'failover':>9}{'eject':>6}{'backoff':>8}"
                 f"{'rejected':>9}{'dropped':>8}{'lost':>6}")
    for a in view["analyzers"]:
        lines.append(
            f"{a['name']:<12}{a['state']:<10}{a['weight']:>7g}{a['effective_weight']:>6.2g}"
            f"{a['target_share'] * 100:>7.1f}%{a['share'] * 100:>7.1f}%"
            f"{a['routed_messages']:>13}{a['delivered_messages']:>11}{a['queue_packets']:>7}{a['failed_attempts']:>8}"
            f"{a['failover_packets']:>9}{a.get('ejections', 0):>6}{a.get('backoff_s', 0):>7.0f}s"
            f"{a['rejected_packets']:>9}{a['shutdown_dropped_packets']:>8}{a['lost_packets']:>6}"
        )
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    if args.fleet:
        from distributor.control.fleet import run_fleet_status

        return run_fleet_status(args)
    try:
        while True:
            view = fetch(args.admin)
            if args.json:
                print(json.dumps(view, indent=2))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(render(view), flush=True)
            if not args.watch:
                return 0
            time.sleep(1.0)
    except (urllib.error.URLError, OSError) as exc:
        print(f"distributor status: cannot reach the control plane at {args.admin}: {exc}")
        return 1
    except KeyboardInterrupt:
        return 0
