"""Per-analyzer compression of the bodies sent to analyzers, end to end with the real analyzer service."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

from distributor.tools.localcluster import LocalCluster, wait_until
from support import Client, packet

SETTINGS = (("a1", "batch", "gzip"), ("a2", "batch", "zstd"), ("a3", "batch", "none"), ("a4", "packet", "gzip"))


def write_config(path: Path, cluster: LocalCluster, settings: tuple[tuple[str, str, str], ...]) -> None:
    path.write_text("".join(
        f'[[analyzers]]\nname = "{name}"\nurl = "{cluster.analyzer(name).url}"\nweight = 1\nmode = "{mode}"\n'
        f'compression = "{compression}"\n\n' for name, mode, compression in settings))


def sent(cluster: LocalCluster, count: int, prefix: str) -> set[tuple[str, str]]:
    client = Client(cluster.data_port)
    for i in range(count):
        assert client.post(packet(emitter="c", packet_id=f"{prefix}-{i}", messages=20))[0] == 202
    client.close()
    return {("c", f"{prefix}-{i}") for i in range(count)}


def received(cluster: LocalCluster) -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    for proc in cluster.analyzer_procs:
        keys |= set(proc.packet_keys())
    return keys


def test_each_analyzer_gets_its_encoding_and_every_packet_arrives(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path,
) -> None:
    cluster = make_cluster(analyzers=tuple((name, 1.0) for name, _, _ in SETTINGS), start_distributor=False)
    config = tmp_path / "distributor.toml"
    write_config(config, cluster, SETTINGS)
    cluster.analyzer_flags = False
    cluster.distributor_args = ["--config", str(config)]
    cluster.start_distributor_process()
    wanted = sent(cluster, 200, "first")
    wait_until(lambda: wanted <= received(cluster), 15, "every packet at an analyzer")
    stats = cluster.analyzer_totals()
    for name, _, compression in SETTINGS:
        encodings = stats[name]["encodings"]
        assert encodings[compression if compression != "none" else "identity"] == stats[name]["requests"] > 0, stats
        if compression != "none":
            assert stats[name]["wire_bytes"] < stats[name]["bytes_received"] / 2, (name, stats[name])
    # a reload that changes compression reaches the running workers (a new incarnation of the slot)
    changed = tuple((name, mode, "zstd" if name == "a3" else compression) for name, mode, compression in SETTINGS)
    write_config(config, cluster, changed)
    before = cluster.analyzer("a3").stats()["encodings"]["zstd"]
    assert cluster.distributor is not None
    cluster.distributor.signal(signal.SIGHUP)
    distributor = cluster.distributor
    wait_until(lambda: "reloaded" in distributor.log_tail(30), 10, "the reload")
    wanted = sent(cluster, 200, "second")
    wait_until(lambda: wanted <= received(cluster), 15, "every packet after the reload")
    assert cluster.analyzer("a3").stats()["encodings"]["zstd"] > before
