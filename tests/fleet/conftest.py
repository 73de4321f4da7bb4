"""The fleet marker and the fleet fixture: one set of namespaces and processes for every scenario of a module."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from fleet.fleet_net import NetnsUnavailable, Topology
from fleet.fleet_support import LAYOUT, Fleet


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fleet: multi-host tests in network namespaces (root, iproute2, haproxy)")


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add); CI runs ./test.sh as root")
    for tool in ("ip", "haproxy"):
        if shutil.which(tool) is None:
            message = f"`{tool}` is missing: apt-get install -y iproute2 haproxy (./test.sh does, as root)"
            if os.environ.get("CI"):
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
    workdir = Path(tempfile.mkdtemp(prefix="fleet-"))
    net = Topology()
    try:
        try:
            net.create(LAYOUT)
        except NetnsUnavailable as exc:
            pytest.skip(f"cannot create network namespaces here (`ip netns add` failed): {exc}")
        fleet = Fleet(net, workdir)
        try:
            fleet.start()
        except BaseException:
            for proc in net.procs:
                print(f"--- {proc.name} ({proc.host}) log ---\n{proc.log_tail(30)}")
            raise
        failed_before = request.session.testsfailed
        yield fleet
        if request.session.testsfailed > failed_before:  # a scenario failed: show what the processes said
            for proc in net.procs:
                if not proc.name.startswith("load-"):
                    print(f"--- {proc.name} ({proc.host}) log ---\n{proc.log_tail(30)}")
    finally:
        net.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def healed(fleet: Fleet) -> Iterator[Fleet]:
    """A scenario starts on a quiet fleet and leaves none of its faults behind, even when it fails."""
    fleet.net.heal()
    fleet.delay_file.write_text("0")
    fleet.wait_quiet()
    try:
        yield fleet
    finally:
        fleet.net.heal()
        fleet.delay_file.write_text("0")
