"""Shared fixtures: real analyzers and distributors on 127.0.0.1, always stopped by PID."""

from __future__ import annotations

import os
from typing import Any, Callable, Generator, Iterator

import pytest

from distributor.tools.localcluster import LocalCluster

# Every distributor a test starts inherits this: shedding on event-loop lag depends on how busy the
# test machine is, which no test may depend on. The tests of that guard turn it on with --set
# (the command line wins over the environment).
os.environ.setdefault("DISTRIBUTOR_INGEST_MAX_LOOP_LAG", "0")


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., LocalCluster]]:
    """Factory for started LocalClusters; every one is stopped at teardown, logs shown on failure."""
    clusters: list[LocalCluster] = []

    def factory(**kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(**kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield factory
    for cluster in clusters:
        cluster.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for cluster in clusters:
            for proc in [cluster.distributor, *cluster.analyzer_procs]:
                if proc is not None:
                    print(f"--- {proc.name} log ---\n{proc.log_tail(60)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
