"""Fuzz target: the configuration loader, TOML bytes to a Config (``resolve`` with a config file).

Invariants: every input gives a validated Config or a ConfigError, never another exception (what
``distributor serve`` promises: one clear line and exit 2, never a traceback); and a Config that
validates survives the trip to the workers (``for_workers`` -> orjson -> ``from_dict``) unchanged,
the admin token aside, so a configuration the supervisor accepts never stops a worker from booting.
"""

from __future__ import annotations

import dataclasses
import os

import orjson

from fuzzlib import instrumented, main

with instrumented("distributor", "tomllib"):
    from distributor.config import Config, ConfigError, from_dict, resolve

# the file resolve() reads: an in-memory file (a regular file to fstat), so a run leaves nothing behind
FD = os.memfd_create("fuzz-config.toml")
PATH = f"/proc/self/fd/{FD}"


def check(data: bytes) -> None:
    os.ftruncate(FD, 0)
    os.pwrite(FD, data, 0)
    try:
        config = resolve(PATH, {}, {}, {})
    except ConfigError as exc:
        assert str(exc), "a ConfigError must say what is wrong"
        return
    assert isinstance(config, Config)
    shipped = orjson.loads(orjson.dumps(config.for_workers()))  # what the supervisor puts in the worker's env
    rebuilt = from_dict(shipped)
    assert rebuilt == dataclasses.replace(config, admin=dataclasses.replace(config.admin, token="")), \
        "the workers' configuration differs from the supervisor's"


if __name__ == "__main__":
    main(check, "toml")
