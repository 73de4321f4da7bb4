"""Shared fixtures: real analyzers and distributors on 127.0.0.1, always stopped by PID."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

import pytest

from cluster_helpers import ConfigFileCluster, show_logs
from distributor.tools.localcluster import LocalCluster
from tls_certs import make_certs

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
    show_logs(request, clusters)


@pytest.fixture
def file_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., ConfigFileCluster]]:
    """Factory for started ConfigFileClusters (every setting in one TOML file, so SIGHUP reloads it); every one
    is stopped at teardown, logs shown on failure."""
    clusters: list[ConfigFileCluster] = []

    def factory(analyzers: Sequence[tuple[str, float]] = (("a1", 1.0),), workers: int = 1,
                settings: dict[str, object] | None = None, analyzer_args: dict[str, list[str]] | None = None,
                extra_analyzers: list[tuple[str, str, float]] | None = None) -> ConfigFileCluster:
        cluster = ConfigFileCluster(analyzers=analyzers, workers=workers, analyzer_args=analyzer_args or {},
                                    start_distributor=False, analyzer_flags=False,
                                    config_path=tmp_path / f"distributor-{len(clusters)}.toml",
                                    settings=dict(settings or {}), extra_analyzers=list(extra_analyzers or []))
        clusters.append(cluster)
        cluster.start()
        cluster.write()
        cluster.start_distributor_process()
        return cluster

    yield factory
    for cluster in clusters:
        cluster.stop()
    show_logs(request, clusters, 80)


@pytest.fixture(scope="module")
def quick_span_export() -> Iterator[None]:
    """The BatchSpanProcessor's standard variable: distributors started meanwhile export spans every 100 ms, not 5 s."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        yield


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TLS tests' certificates (tls_certs.ISSUED), made once per run; skips without the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
