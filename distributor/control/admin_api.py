"""Mutating admin endpoints of the control plane: drain, weights, add, remove.

Every mutating call needs ``Authorization: Bearer <admin.token>`` (compared in
constant time); with no token configured they answer 403 rather than being
open. Every change is logged (who, what, old, new) and counted.
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson
from aiohttp import web

from distributor.delivery.analyzer_set import UnknownAnalyzer
from distributor.config import MODES, AnalyzerConfig, ConfigError

if TYPE_CHECKING:
    from distributor.supervisor import Supervisor

log = logging.getLogger("distributor.admin")
Handler = Callable[[web.Request], Awaitable[web.Response]]


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
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
                return error(401, "unauthorized", "missing or wrong bearer token",
                             {"WWW-Authenticate": 'Bearer realm="distributor-admin"'})
            try:
                return await handler(request)
            except UnknownAnalyzer as exc:
                return error(404, "unknown_analyzer", f"no analyzer named {exc.args[0]!r}")
            except ConfigError as exc:
                return error(400, "invalid_change", str(exc))

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
        weight = body.get("weight")
        if set(body) != {"weight"} or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError('body: expected {"weight": <positive number>}')
        old = self._supervisor.analyzers.set_weight(name, float(weight))
        return self._audit(request, "weight", name, {"weight": old}, {"weight": float(weight)})

    async def add(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        unknown = set(body) - {"name", "url", "weight", "mode"}
        if unknown or not {"name", "url", "weight"} <= set(body):
            raise ConfigError('body: expected {"name", "url", "weight"[, "mode"]}')
        weight = body["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError("weight: must be a positive number")
        if body.get("mode", "batch") not in MODES:
            raise ConfigError(f"mode: must be one of {', '.join(MODES)}")
        analyzer = AnalyzerConfig(name=body["name"], url=body["url"], weight=float(weight),
                                  mode=body.get("mode", "batch"))
        self._supervisor.analyzers.add(analyzer)
        response = self._audit(request, "add", analyzer.name, None, body)
        response.set_status(201)
        return response

    async def remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._supervisor.analyzers.remove(name)
        response = self._audit(request, "remove", name, {"present": True}, {"present": False, "draining": True})
        response.set_status(202)
        return response
