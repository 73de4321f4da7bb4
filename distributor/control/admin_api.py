"""Mutating admin endpoints of the control plane: drain, weights, add, remove.

Every mutating call needs ``Authorization: Bearer <admin.token>`` (compared in
constant time); with no token configured they answer 403 rather than being
open. Every change is logged (who, what, old, new) and counted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
from aiohttp import web

from distributor.delivery.analyzer_set import StateNotSaved, UnknownAnalyzer
from distributor.delivery.slots import SlotsBusy
from distributor.config import ConfigError, check_weight, parse_analyzer

if TYPE_CHECKING:
    from distributor.supervisor import Supervisor

log = logging.getLogger("distributor.admin")
SLOT_WAIT, SLOT_POLL = 2.0, 0.05  # an add waits this long for a removed analyzer's slot to be forgotten
Handler = Callable[[web.Request], Awaitable[web.Response]]


def _raw(text: str) -> bytes:
    """The header's bytes back: aiohttp decodes a non-UTF-8 header with surrogateescape, which .encode() rejects."""
    return text.encode("utf-8", "surrogateescape")


def error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps({"error": error, "detail": detail}), status=status,
                        content_type="application/json", headers=headers)


class AdminApi:
    def __init__(self, supervisor: "Supervisor", view: Callable[[str], dict[str, Any] | None]) -> None:
        self._supervisor = supervisor
        self._view = view
        self.changes: Counter[str] = Counter()

    def register(self, app: web.Application) -> None:
        router = app.router
        router.add_post("/admin/analyzers/{name}/drain", self._guard(self.drain))
        router.add_post("/admin/analyzers/{name}/undrain", self._guard(self.undrain))
        router.add_put("/admin/analyzers/{name}", self._guard(self.set_weight))
        router.add_delete("/admin/analyzers/{name}", self._guard(self.remove))
        router.add_post("/admin/analyzers", self._guard(self.add))

    def _guard(self, handler: Handler) -> Handler:
        """Auth first; then map the analyzer set's errors to JSON answers."""

        async def guarded(request: web.Request) -> web.Response:
            token = self._supervisor.config.admin.token
            if not token:
                return error(403, "admin_disabled",
                             "mutating admin endpoints are disabled: set admin.token or DISTRIBUTOR_ADMIN_TOKEN")
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(_raw(given), _raw(token)):
                return error(401, "unauthorized", "missing or wrong bearer token",
                             {"WWW-Authenticate": 'Bearer realm="distributor-admin"'})
            try:
                return await handler(request)
            except UnknownAnalyzer as exc:
                return error(404, "unknown_analyzer", f"no analyzer named {exc.args[0]!r}")
            except ConfigError as exc:
                return error(400, "invalid_change", str(exc))
            except StateNotSaved as exc:
                return error(500, "state_not_saved", str(exc))

        return guarded

    def _audit(self, request: web.Request, action: str, name: str, old: Any, new: Any) -> web.Response:
        self.changes[action] += 1
        log.info("admin change: %s %s by %s: %s -> %s", action, name, request.remote, old, new,
                 extra={"event": "admin_change", "action": action, "analyzer": name, "who": request.remote,
                        "old": old, "new": new})
        return web.Response(body=orjson.dumps({"action": action, "analyzer": self._view(name) or {"name": name}}),
                            content_type="application/json")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"body: invalid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ConfigError("body: expected a JSON object")
        return body

    async def drain(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        old = self._supervisor.analyzers.drain(name)
        return self._audit(request, "drain", name, {"draining": old}, {"draining": True})

    async def undrain(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        old = self._supervisor.analyzers.undrain(name)
        return self._audit(request, "undrain", name, {"draining": old}, {"draining": False})

    async def set_weight(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await self._body(request)
        if set(body) != {"weight"}:
            raise ConfigError('body: expected {"weight": <number>}')
        weight = check_weight("body.weight", body["weight"])
        old = self._supervisor.analyzers.set_weight(name, weight)
        return self._audit(request, "weight", name, {"weight": old}, {"weight": weight})

    async def add(self, request: web.Request) -> web.Response:
        # validated completely (byte limits, URL, networks) before the analyzer set is touched
        analyzer = parse_analyzer("body", await self._body(request), self._supervisor.config.analyzer_rules)
        deadline = time.monotonic() + SLOT_WAIT
        while True:
            try:
                self._supervisor.analyzers.add(analyzer)
                break
            except SlotsBusy:  # workers apply table changes within a heartbeat or two: give them that long
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(SLOT_POLL)
        response = self._audit(request, "add", analyzer.name, None, dataclasses.asdict(analyzer))
        response.set_status(201)
        return response

    async def remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._supervisor.analyzers.remove(name)
        response = self._audit(request, "remove", name, {"present": True}, {"present": False, "draining": True})
        response.set_status(202)
        return response
