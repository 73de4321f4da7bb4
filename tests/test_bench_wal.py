"""The wal scenario end to end, tiny: the log off, sync none/interval/always and the nginx proxy, once
each, on one worker with free analyzers: structure, delivery checks and the log's own counters of the
report, never speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_bench import needs_nginx_and_wrk
from test_bench_ingest import bench


@pytest.mark.timeout(120)
def test_bench_wal_every_mode_and_nginx(tmp_path: Path) -> None:
    needs_nginx_and_wrk()
    _, report = bench(tmp_path, "--sinks", "nginx", "--scenarios", "wal", "--rounds", "1",
                      "--wal-dir", str(tmp_path))
    assert report["check"]["passed"] is True
    runs = {r["scenario"]: r for r in report["runs"]}
    assert list(runs) == ["wal:off", "wal:none", "wal:interval", "wal:always", "wal:nginx"]
    for name, run in runs.items():
        assert run["check"]["passed"] and run["accepted_packets"] > 0, (name, run["check"])
        if name != "wal:nginx":
            assert run["check"]["delivered_eq_accepted"], (name, run["check"])
    for mode in ("none", "interval", "always"):
        run = runs[f"wal:{mode}"]
        # every packet the distributor accepted in the run was written to the log, and nothing else
        assert run["wal"]["appended_packets"] == run["check"]["distributor_accepted_packets"], (mode, run["wal"])
        wal = run["wal"]
        assert wal["bytes_written_per_packet"] > 32  # a 32-byte record header, then the packet as received
    assert runs["wal:none"]["wal"]["fsyncs_per_s"] == 0
    assert runs["wal:always"]["wal"]["fsyncs_per_s"] > 0 and runs["wal:interval"]["wal"]["fsyncs_per_s"] > 0
    modes = report["wal"]["modes"]
    assert set(modes) == {"off", "none", "interval", "always", "nginx"}
    assert modes["off"]["over_off"]["min"] == 1.0
    assert {"wal_interval_2xx_per_s_ge_0.85x_off", "wal_always_2xx_per_s_ge_0.5x_off"} <= set(report["targets"])
