"""One view and one change across a fleet of distributor instances (``--fleet URL,URL,...``).

Each instance routes, rate-limits, health-checks and takes admin changes on its own (README "Scaling
out"). This module is what an operator needs on top: ``distributor status --fleet`` reads every
instance's control plane at once and sums workers and analyzers over the fleet (saying which
instance did not answer, and where the instances disagree about an analyzer), and ``distributor
admin --fleet`` applies one change to every instance and reports each outcome.

A fleet change is never half-applied in silence. Every instance is read first (the preflight),
then changed, then read again to check that the change is in effect; the result is one line per
instance and a non-zero exit unless every instance ends in the requested state. Re-running the same
command is safe: drain, undrain and weight are idempotent in the admin API, an ``add`` that finds
the analyzer already defined the same way counts as done (a different definition is a conflict,
left untouched; the same one while it drains is not done: it may be a removal in progress), and a
``remove`` that finds it gone (or already being removed) counts as done. A 5xx answer is verified
like a success (a proxy in front of the instance may have lost the answer of an applied change).

Standard library only (threads for the concurrent requests), like ``distributor status``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from distributor.control.client import http_json

MIB = 1 << 20
TIMEOUT = 5.0  # seconds per request to one instance
T = TypeVar("T")

# Per-analyzer counters of /admin/analyzers that add up over instances.
ANALYZER_SUMS = (
    "routed_messages", "routed_packets", "net_routed_messages", "delivered_messages", "delivered_packets",
    "queue_packets", "queue_messages", "queue_bytes", "queue_capacity_packets", "failed_attempts", "retries",
    "failover_packets", "failover_messages", "rejected_packets", "rejected_messages", "shutdown_dropped_packets",
    "shutdown_dropped_messages", "lost_packets", "lost_messages", "possible_duplicates", "ejections",
)
# Per-worker counters and gauges of /admin/workers that add up over workers and instances.
WORKER_SUMS = (
    "accepted_packets", "requests", "connections", "queued_packets", "queued_bytes", "shed_packets",
    "loop_lag_shed_packets", "rate_limited_packets", "rejected_invalid", "rejected_unavailable",
    "wal_unavailable_packets", "restarts", "rss_bytes",
)
DEFINITION = ("url", "weight", "mode", "compression")
REMOVED = "removed"  # the state of an analyzer that was removed: listed for its counters, no longer defined


class FleetError(ValueError):
    """A bad ``--fleet`` value."""


def _addresses(host: str, port: int) -> set[str]:
    """The addresses ``host`` stands for (itself when it does not resolve: the request will say so)."""
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)} or {host}
    except (OSError, UnicodeError):
        return {host}


def parse_fleet(text: str) -> list[str]:
    """``URL,URL,...`` -> control plane base URLs (http or https, host and port, no path), in order, once each.

    "Once each" is per instance, not per spelling: ``HTTP://Host:80``, ``http://host`` and ``http://host/`` are
    one URL, and two names for the same address and port (``localhost`` and ``127.0.0.1``) one instance; the
    first spelling is kept. Counting an instance twice would double its workers and counters in the fleet view.
    """
    urls: list[str] = []
    seen: list[tuple[str, int, set[str]]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            parts = urllib.parse.urlsplit(item)
        except ValueError:  # "http://[::1": a bracket left open
            raise FleetError(f"--fleet: {item!r} is not an http:// or https:// URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FleetError(f"--fleet: {item!r} is not an http:// or https:// URL")
        if parts.path not in ("", "/") or parts.query or parts.fragment or item.rstrip("/")[-1:] in ("?", "#"):
            raise FleetError(f"--fleet: {item!r}: give the control plane's base URL (no path), "
                             f"e.g. http://10.0.0.1:9091")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FleetError(f"--fleet: {item!r}: bad port") from None
        addresses = _addresses(parts.hostname, port)
        if any(scheme == parts.scheme and p == port and addresses & known for scheme, p, known in seen):
            continue
        seen.append((parts.scheme, port, addresses))
        urls.append(item.rstrip("/"))
    if not urls:
        raise FleetError("--fleet: no URL given (URL,URL,...)")
    return urls


def for_each(urls: Sequence[str], call: Callable[[str], T]) -> list[T]:
    """``call(url)`` for every instance at once (one thread each), results in the order of ``urls``."""
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(urls)))) as pool:
        return list(pool.map(call, urls))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"cannot reach the control plane: {exc.reason}"
    if isinstance(exc, (TimeoutError, OSError)):
        return f"cannot reach the control plane: {exc.__class__.__name__}: {exc}"
    return f"{exc.__class__.__name__}: {exc}"


def _get(url: str, path: str, timeout: float) -> Any:
    status, body = http_json(url + path, timeout=timeout)
    if status != 200 or not isinstance(body, dict):
        raise ValueError(f"GET {path} answered HTTP {status}: {str(body)[:200]}")
    return body


# --------------------------------------------------------------------------- one view


@dataclass
class InstanceView:
    """What one instance's control plane said (``error`` set when it did not answer)."""

    url: str
    workers: list[dict[str, Any]] = field(default_factory=list)
    analyzers: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.error is None


def fetch_instance(url: str, timeout: float = TIMEOUT) -> InstanceView:
    try:
        workers = _get(url, "/admin/workers", timeout)["workers"]
        analyzers = _get(url, "/admin/analyzers", timeout)["analyzers"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        return InstanceView(url, error=_reason(exc))
    return InstanceView(url, workers, analyzers)


def fetch_fleet(urls: Sequence[str], timeout: float = TIMEOUT) -> list[InstanceView]:
    return for_each(urls, lambda url: fetch_instance(url, timeout))


def _definition(analyzer: dict[str, Any]) -> dict[str, Any]:
    return {key: analyzer.get(key) for key in DEFINITION}


def aggregate(views: Sequence[InstanceView]) -> dict[str, Any]:
    """The fleet view: per instance, per analyzer summed over instances, totals, and disagreements.

    ``share`` is an analyzer's fraction of every message the answering instances routed (net of
    failovers, like an instance's own ``share``); ``weight_share`` its configured weight over the sum
    of the weights defined on each instance (what the split converges to while every instance can reach
    every analyzer), or None when the instances disagree about it (a weight or an analyzer differs, it
    is removed everywhere): the fleet's split then depends on each instance's traffic.
    ``not_routable_on`` lists the instances on which it takes no new packets (down, ejected,
    drained), so a partition between one instance and one analyzer shows up by name.
    """
    answered = [v for v in views if v.answered]
    instances = []
    for view in views:
        entry: dict[str, Any] = {"url": view.url, "answered": view.answered, "error": view.error}
        if view.answered:
            entry["workers"] = len(view.workers)
            entry["workers_ready"] = sum(1 for w in view.workers if w.get("state") == "ready")
            entry.update({key: sum(w.get(key, 0) or 0 for w in view.workers) for key in WORKER_SUMS})
            entry["routed_messages"] = sum(a.get("net_routed_messages", 0) for a in view.analyzers)
        instances.append(entry)

    names: list[str] = []
    for view in answered:
        names.extend(a["name"] for a in view.analyzers if a["name"] not in names)
    defined = {view.url: {a["name"] for a in view.analyzers if a.get("state") != REMOVED} for view in answered}
    analyzers: list[dict[str, Any]] = []
    drift: list[str] = []
    for name in names:
        rows = {view.url: a for view in answered for a in view.analyzers if a["name"] == name}
        states: dict[str, int] = {}
        for row in rows.values():
            states[row["state"]] = states.get(row["state"], 0) + 1
        definitions = {url: _definition(row) for url, row in rows.items() if name in defined[url]}
        consistent = len({json.dumps(d, sort_keys=True) for d in definitions.values()}) <= 1
        missing = [view.url for view in answered if name not in defined[view.url]] if definitions else []
        if missing:
            drift.append(f"{name}: not defined on {', '.join(missing)}")
        if not consistent:
            drift.append(f"{name}: defined differently: " + "; ".join(
                f"{url} " + " ".join(f"{k}={v}" for k, v in d.items()) for url, d in definitions.items()))
        first = next((rows[url] for url in definitions), next(iter(rows.values())))
        row_view: dict[str, Any] = {
            "name": name,
            **{key: (first.get(key) if consistent else None) for key in DEFINITION},
            "defined_on": len(definitions),
            "consistent": consistent and not missing,
            "states": states,
            "not_routable_on": [url for url, row in rows.items() if not row.get("effective_weight")],
            **{key: sum(row.get(key, 0) or 0 for row in rows.values()) for key in ANALYZER_SUMS},
            "per_instance": {url: {"state": row["state"], "weight": row.get("weight"),
                                   "target_share": row.get("target_share", 0.0),
                                   "net_routed_messages": row.get("net_routed_messages", 0),
                                   "queue_packets": row.get("queue_packets", 0)} for url, row in rows.items()},
        }
        analyzers.append(row_view)
    routed = sum(a["net_routed_messages"] for a in analyzers)
    # the configured share on each instance, over the analyzers defined there (removed ones have no weight);
    # the fleet's is that share when every instance agrees, else None (then it depends on each one's traffic)
    own_shares: dict[str, dict[str, float]] = {}
    for view in answered:
        weights = {a["name"]: a.get("weight") or 0.0 for a in view.analyzers if a["name"] in defined[view.url]}
        total = sum(weights.values())
        own_shares[view.url] = {name: weight / total for name, weight in weights.items()} if total else {}
    for a in analyzers:
        a["share"] = a["net_routed_messages"] / routed if routed else 0.0
        shares = [own_shares[view.url].get(a["name"], 0.0) for view in answered]
        agreed = a["defined_on"] and shares and max(shares) - min(shares) <= 1e-9
        a["weight_share"] = shares[0] if agreed else None

    totals = {key: sum(i.get(key, 0) for i in instances if i["answered"]) for key in WORKER_SUMS}
    totals.update({
        "instances": len(views), "instances_answered": len(answered),
        "workers": sum(i.get("workers", 0) for i in instances),
        "workers_ready": sum(i.get("workers_ready", 0) for i in instances),
        "routed_messages": routed,
    })
    workers = [{"instance": view.url, **w} for view in answered for w in view.workers]
    return {
        "instances": instances,
        "unreachable": [{"url": v.url, "error": v.error} for v in views if not v.answered],
        "totals": totals,
        "analyzers": analyzers,
        "workers": workers,
        "drift": drift,
    }


def _label(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def render(fleet: dict[str, Any]) -> str:
    totals = fleet["totals"]
    lines = [f"fleet: {totals['instances_answered']} of {totals['instances']} instances answered, "
             f"{totals['workers_ready']}/{totals['workers']} workers ready"]
    lines.append(f"{'instance':<24}{'workers':>8}{'accepted':>12}{'routed msgs':>13}{'conns':>7}{'queued':>8}"
                 f"{'shed':>7}{'429':>7}{'rss MB':>8}  error")
    for i in fleet["instances"]:
        if not i["answered"]:
            lines.append(f"{_label(i['url']):<24}{'-':>4}{'':<4}{'-':>12}{'-':>13}{'-':>7}{'-':>8}{'-':>7}{'-':>7}{'-':>8}"
                         f"  DID NOT ANSWER: {i['error']}")
            continue
        lines.append(f"{_label(i['url']):<24}{i['workers_ready']:>4}/{i['workers']:<3}{i['accepted_packets']:>12}"
                     f"{i['routed_messages']:>13}{i['connections']:>7}{i['queued_packets']:>8}{i['shed_packets']:>7}"
                     f"{i['rate_limited_packets']:>7}{i['rss_bytes'] / MIB:>8.0f}")
    lines.append(f"{'total':<24}{totals['workers_ready']:>4}/{totals['workers']:<3}{totals['accepted_packets']:>12}"
                 f"{totals['routed_messages']:>13}{totals['connections']:>7}{totals['queued_packets']:>8}"
                 f"{totals['shed_packets']:>7}{totals['rate_limited_packets']:>7}{totals['rss_bytes'] / MIB:>8.0f}")
    lines.append("")
    lines.append(f"{'analyzer':<12}{'states':<22}{'weight':>7}{'w share':>8}{'actual':>8}{'routed msgs':>13}"
                 f"{'delivered':>11}{'queue':>7}{'failed':>8}{'failover':>9}{'rejected':>9}{'dropped':>8}{'lost':>6}")
    for a in fleet["analyzers"]:
        states = " ".join(f"{state}x{n}" for state, n in sorted(a["states"].items()))
        weight = "-" if not a["defined_on"] else f"{a['weight']:g}" if a["weight"] is not None else "mixed"
        target = f"{a['weight_share'] * 100:.1f}%" if a["weight_share"] is not None else "-"
        lines.append(f"{a['name']:<12}{states:<22}{weight:>7}{target:>8}{a['share'] * 100:>7.1f}%"
                     f"{a['net_routed_messages']:>13}{a['delivered_messages']:>11}{a['queue_packets']:>7}"
                     f"{a['failed_attempts']:>8}{a['failover_packets']:>9}{a['rejected_packets']:>9}"
                     f"{a['shutdown_dropped_packets']:>8}{a['lost_packets']:>6}")
        if a["not_routable_on"] and a["defined_on"]:  # removed everywhere: its states say so
            lines.append(f"{'':<12}takes no new packets on: {', '.join(_label(u) for u in a['not_routable_on'])}")
    for line in fleet["drift"]:
        lines.append(f"DRIFT {line}")
    for u in fleet["unreachable"]:
        lines.append(f"NOT ANSWERED {u['url']}: {u['error']} (its workers and counters are missing from the totals)")
    return "\n".join(lines)


def run_fleet_status(args: argparse.Namespace) -> int:
    """``distributor status --fleet``: 0 when every instance answered, 1 when one did not (the rest is shown)."""
    try:
        urls = parse_fleet(args.fleet)
    except FleetError as exc:
        print(f"distributor status: {exc}")
        return 2
    try:
        while True:
            fleet = aggregate(fetch_fleet(urls))
            if args.json:
                print(json.dumps(fleet, indent=2))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(render(fleet), flush=True)
            if not args.watch:
                return 1 if fleet["unreachable"] else 0
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------- one change

APPLIED, ALREADY, FAILED = "applied", "already", "failed"


@dataclass(frozen=True)
class Change:
    """One admin change, as ``distributor admin`` takes it."""

    action: str  # drain | undrain | weight | add | remove
    name: str
    weight: float | None = None
    url: str | None = None
    mode: str = "batch"
    compression: str = "none"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Change":
        return cls(args.action, args.name, getattr(args, "weight", None), getattr(args, "url", None),
                   getattr(args, "mode", "batch"), getattr(args, "compression", "none"))

    def request(self) -> tuple[str, str, dict[str, Any] | None]:
        """(method, path, JSON body) of the admin API call."""
        base = "/admin/analyzers"
        quoted = urllib.parse.quote(self.name, safe="")
        if self.action in ("drain", "undrain"):
            return "POST", f"{base}/{quoted}/{self.action}", None
        if self.action == "remove":
            return "DELETE", f"{base}/{quoted}", None
        if self.action == "weight":
            return "PUT", f"{base}/{quoted}", {"weight": self.weight}
        if self.action == "add":
            return "POST", base, {"name": self.name, **self.definition()}
        raise ValueError(f"unknown action {self.action!r}")

    def definition(self) -> dict[str, Any]:
        return {"url": self.url, "weight": self.weight, "mode": self.mode, "compression": self.compression}

    def describe(self) -> str:
        if self.action == "weight":
            return f"weight {self.name} {self.weight:g}"
        if self.action == "add":
            return f"add {self.name} {self.url} {self.weight:g} (mode {self.mode}, compression {self.compression})"
        return f"{self.action} {self.name}"

    def in_effect(self, analyzer: dict[str, Any] | None) -> str | None:
        """None when an instance's view of the analyzer shows this change in effect, else what is off."""
        if self.action == "remove":
            if analyzer is None or analyzer.get("draining"):
                return None  # gone, or being removed (drains first, then leaves)
            return "still present and not being removed"
        if analyzer is None:
            return f"no analyzer named {self.name!r}"
        if self.action == "drain":
            return None if analyzer.get("draining") else "not draining"
        if self.action == "undrain":
            return None if not analyzer.get("draining") else "still draining"
        if self.action == "weight":
            return None if analyzer.get("weight") == self.weight else f"weight is {analyzer.get('weight')}"
        mine = self.definition()
        theirs = _definition(analyzer)
        if theirs == mine:
            if analyzer.get("draining"):  # the view does not tell a drain from a pending removal
                return ("defined the same way but draining: drained by an operator (undrain it), or being "
                        "removed (it leaves once its queues are empty: re-run then)")
            return None
        return "defined differently: " + ", ".join(f"{k} {theirs[k]!r} (not {mine[k]!r})"
                                                    for k in DEFINITION if theirs[k] != mine[k])


@dataclass
class Outcome:
    """What happened on one instance: ``applied``, ``already`` (nothing to do) or ``failed``."""

    instance: str
    result: str
    detail: str
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.result in (APPLIED, ALREADY)


def _find(analyzers: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The analyzer ``name``, or None when absent or removed (a removed one stays listed for its counters)."""
    return next((a for a in analyzers if a.get("name") == name and a.get("state") != REMOVED), None)


def _call(url: str, change: Change, token: str, timeout: float) -> tuple[int, Any]:
    method, path, body = change.request()
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode() if body is not None else None, method=method,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode(errors="replace")[:200]


def apply_instance(url: str, change: Change, token: str, timeout: float = TIMEOUT) -> Outcome:
    """Preflight, change, verify on one instance; never raises."""
    try:
        before = _find(_get(url, "/admin/analyzers", timeout)["analyzers"], change.name)
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        return Outcome(url, FAILED, f"not applied: {_reason(exc)}")
    if change.action == "add" and before is not None:
        off = change.in_effect(before)
        if off is None:
            return Outcome(url, ALREADY, "already defined the same way")
        if _definition(before) == change.definition():  # the same, but draining: it may be on its way out
            return Outcome(url, FAILED, f"not applied: {off}")
        return Outcome(url, FAILED, f"not applied: conflict: {change.name} exists here, {off}; "
                                    "remove it there first or add it under another name")
    if change.action == "remove" and before is None:
        return Outcome(url, ALREADY, "already absent")
    if change.action not in ("add", "remove") and before is None:
        return Outcome(url, FAILED, f"not applied: no analyzer named {change.name!r} on this instance")
    already = before is not None and change.action in ("drain", "undrain", "weight") and change.in_effect(before) is None
    try:
        status, body = _call(url, change, token, timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return Outcome(url, FAILED, f"unknown whether applied: {_reason(exc)}; re-run to make sure")
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if status == 404 and change.action == "remove":
        return Outcome(url, ALREADY, "already absent", status)
    if 300 <= status < 500 and not (status == 400 and change.action == "add"):
        return Outcome(url, FAILED, f"not applied: HTTP {status}: {detail}", status)
    # verify: the instance's own view shows the change (an add refused as "already exists" by a
    # concurrent add counts when the definition is the same). A 5xx is verified too: the instance, or a
    # proxy in front of it that lost its answer, may have applied the change before failing.
    try:
        after = _find(_get(url, "/admin/analyzers", timeout)["analyzers"], change.name)
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        if status >= 500:
            return Outcome(url, FAILED, f"unknown whether applied: HTTP {status} ({detail}), then {_reason(exc)}; "
                                        "re-run to make sure", status)
        return Outcome(url, FAILED, f"answered HTTP {status} but could not be verified: {_reason(exc)}", status)
    off = change.in_effect(after)
    if off is not None:
        return Outcome(url, FAILED, f"not in effect after HTTP {status} ({detail}): {off}", status)
    if status >= 500:
        if change.action == "remove" and after is not None and before is not None and before.get("draining"):
            # it was drained before: draining now does not tell whether it is being removed
            return Outcome(url, FAILED, f"unknown whether applied: HTTP {status} ({detail}); re-run to make sure",
                           status)
        if already:
            return Outcome(url, ALREADY, f"already in effect (it answered HTTP {status}: {detail})", status)
        return Outcome(url, APPLIED, f"{_applied_detail(change, before)} (in effect, though it answered HTTP "
                                     f"{status}: {detail})", status)
    if already:
        return Outcome(url, ALREADY, "already in effect (re-applied, no change)", status)
    if status >= 300:
        return Outcome(url, ALREADY, "already defined the same way", status)
    return Outcome(url, APPLIED, _applied_detail(change, before), status)


def _applied_detail(change: Change, before: dict[str, Any] | None) -> str:
    if change.action == "weight" and before is not None:
        return f"weight {before.get('weight')} -> {change.weight:g}"
    if change.action in ("drain", "undrain") and before is not None:
        return f"draining {bool(before.get('draining'))} -> {change.action == 'drain'}"
    if change.action == "remove":
        return "removing: drains its queues, then leaves"
    return "added"


def apply_fleet(urls: Sequence[str], change: Change, token: str, timeout: float = TIMEOUT) -> list[Outcome]:
    """Apply ``change`` on every instance at once; one Outcome per instance, in the order of ``urls``."""
    return for_each(urls, lambda url: apply_instance(url, change, token, timeout))


def render_outcomes(change: Change, outcomes: Sequence[Outcome]) -> str:
    lines = [f"distributor admin --fleet: {change.describe()} on {len(outcomes)} instances"]
    width = max(len(o.instance) for o in outcomes)
    for o in outcomes:
        lines.append(f"  {o.instance:<{width}}  {o.result.upper() if not o.ok else o.result:<8} {o.detail}")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines.append(f"NOT in effect on {len(failed)} of {len(outcomes)} instances: the fleet is not consistent. "
                     "Fix the cause and re-run the same command: it is safe to repeat (instances already done "
                     "report 'already').")
    else:
        lines.append(f"in effect on all {len(outcomes)} instances")
    return "\n".join(lines)


def run_fleet_admin(args: argparse.Namespace) -> int:
    """``distributor admin --fleet``: 0 when the change is in effect on every instance, else 1."""
    try:
        urls = parse_fleet(args.fleet)
    except FleetError as exc:
        print(f"distributor admin: {exc}")
        return 2
    token = args.token if args.token is not None else os.environ.get("DISTRIBUTOR_ADMIN_TOKEN", "")
    change = Change.from_args(args)
    outcomes = apply_fleet(urls, change, token)
    if getattr(args, "json", False):
        print(json.dumps({"change": asdict(change), "outcomes": [asdict(o) | {"ok": o.ok} for o in outcomes],
                          "ok": all(o.ok for o in outcomes)}, indent=2))
    else:
        print(render_outcomes(change, outcomes))
    return 0 if all(o.ok for o in outcomes) else 1
