"""Why a packet was not taken: the single-packet answer, or one line of a batch's answer."""

from __future__ import annotations

from typing import NamedTuple

from distributor.ingest.contract import ContractError
from distributor.ingest.http11 import Response, json_error


class Refusal(NamedTuple):
    status: int
    error: str
    detail: str
    retry_after: float | None = None

    def response(self) -> Response:
        return json_error(self.status, self.error, self.detail, self.retry_after)


def invalid(exc: ContractError) -> Refusal:
    """A packet that breaks the contract: 400, or 413 for too many messages."""
    return Refusal(exc.status, "packet_too_large" if exc.status == 413 else "invalid_packet", str(exc))
