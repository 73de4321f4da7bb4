"""The ingest scenario family (issue 13, and the TLS cost of issue 15): what a message costs by the way
it arrives, every variant in the same invocation, on the same workers and the same free (nginx) sinks.

wrk, closed loop, bodies built ahead (payloads.py), 10-message packets; variants (``--ingest-variants``):

* ``single``: one packet per POST /ingest (``--connections``);
* ``batch``: 100 packets per POST /ingest/batch, NDJSON (``--ingest-batch-connections``);
* ``gzip``: the same batches with Content-Encoding: gzip;
* ``otlp``: POST /v1/logs, protobuf ExportLogsServiceRequest of 100 ResourceLogs x 10 records;
* ``tls``: ``single`` over https (``[tls]`` cert_file/key_file, a certificate made with openssl);
* ``trace``: ``single`` with ``tracing.sample_ratio`` = ``--trace-ratio`` and an OTLP receiver started here
  (``single`` is the tracing-off baseline: with a ratio of 0 the tracing code does not even load);
* ``to-gzip``, ``to-zstd``: ``single`` with every analyzer's ``compression`` set so (``single``: none);
  the sinks log each request's Content-Length, so the bytes sent to the analyzers are known.

Rounds alternate the variants (``--rounds``). Every variant but ``tls`` and ``trace`` runs on one
distributor (the same worker processes): the analyzers' compression is switched by rewriting its
config file and SIGHUP (applied live, no worker restarts). ``tls`` and ``trace`` need settings a worker
reads at start (``[tls]``, ``[tracing]``): each gets a distributor of its own, started for its run,
warmed up (``--ingest-warm-up``, 1 s), stopped after it, so one distributor at a time carries load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from distributor.tools.localcluster import LocalCluster, wait_until
from loadtest import generators
from loadtest.bench.cluster import WEIGHTS
from loadtest.bench.ingest_report import summarize
from loadtest.bench.payloads import build_pools, pool_sizes
from loadtest.bench.runner import Bench
from loadtest.bench.services import TlsCluster, TraceReceiver, local_https, make_certificate
from loadtest.cpu import per_answer_us
from loadtest.free_sinks import NginxSinks
from loadtest.generators import RunResult, WrkPool, run_wrk
from loadtest.nginx_baseline import closed_loop_missing


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    pool: str  # payloads.build_pools
    path: str
    setup: str = "plain"  # which distributor: plain (shared), tls or traced (their own)
    compression: str = "none"  # the analyzers'


VARIANTS = (
    Variant("single", "POST /ingest, 1 packet", "single", "/ingest"),
    Variant("batch", "POST /ingest/batch, 100 packets NDJSON", "batch", "/ingest/batch"),
    Variant("gzip", "the same batch, gzip", "gzip", "/ingest/batch"),
    Variant("otlp", "POST /v1/logs protobuf, 100 x 10 records", "otlp", "/v1/logs"),
    Variant("tls", "POST /ingest over TLS", "single", "/ingest", "tls"),
    Variant("trace", "POST /ingest, tracing sampled", "single", "/ingest", "traced"),
    Variant("to-gzip", "POST /ingest, analyzers gzip", "single", "/ingest", compression="gzip"),
    Variant("to-zstd", "POST /ingest, analyzers zstd", "single", "/ingest", compression="zstd"),
)
NAMES = tuple(v.name for v in VARIANTS)


class IngestBench:
    """The pools, the sinks, the receiver and the certificate shared by every variant of the invocation."""

    def __init__(self, args: argparse.Namespace, directory: Path, sinks: NginxSinks, receiver: TraceReceiver,
                 runs: list[dict[str, Any]], certificate: tuple[Path, Path] | None) -> None:
        self.args = args
        self.directory = directory
        self.sinks = sinks
        self.receiver = receiver
        self.runs = runs
        self.pools = build_pools(directory)
        self.certificate = certificate
        self.batch_connections: int = args.ingest_batch_connections or 2 * args.workers

    def config_file(self, setup: str, compression: str) -> Path:
        """The setup's config file: the sinks as analyzers, with that compression (rewritten to switch it)."""
        config = self.directory / f"{setup}.toml"
        config.write_text("".join(f'[[analyzers]]\nname = "{name}"\nurl = "{url}"\nweight = {weight}\n'
                                  f'compression = "{compression}"\n\n' for name, url, weight in self.sinks.urls()))
        return config

    def compress(self, bench: Bench, compression: str) -> None:
        """Switch the analyzers' compression of a running distributor: new config file, SIGHUP, until applied."""
        def applied() -> bool:
            return all(a["compression"] == compression for a in bench.cluster.admin("/admin/analyzers")["analyzers"])

        if applied():
            return
        print(f"[ingest] analyzers' compression -> {compression} (SIGHUP, same workers)", file=sys.stderr, flush=True)
        self.config_file("plain", compression)
        assert bench.cluster.distributor is not None
        bench.cluster.distributor.signal(signal.SIGHUP)
        wait_until(applied, 30, f"compression {compression} applied")

    def distributor(self, setup: str) -> LocalCluster:
        """The distributor of a setup (not started): its config file, plus the setup's settings."""
        settings = ["--config", str(self.config_file(setup, "none")),
                    "--set", f"queue.max_packets={self.args.queue_max_packets}"]
        cluster = LocalCluster
        if setup == "tls":
            assert self.certificate is not None
            cert, key = self.certificate
            settings += ["--set", f"tls.cert_file={cert}", "--set", f"tls.key_file={key}"]
            cluster = TlsCluster
        elif setup == "traced":
            settings += ["--set", f"tracing.sample_ratio={self.args.trace_ratio}",
                         "--set", f"tracing.endpoint={self.receiver.url}"]
        return cluster(analyzers=(), workers=self.args.workers, analyzer_flags=False, distributor_args=settings)

    def url(self, bench: Bench, variant: Variant) -> str:
        return bench.cluster.ingest_url.removesuffix("/ingest") + variant.path

    def connections(self, pool: WrkPool) -> int:
        return self.args.connections if pool.packets == 1 else self.batch_connections

    def warm_up(self, bench: Bench, variant: Variant) -> None:
        """The variant's own load, not recorded: connections, allocator, caches (and the TLS code paths)."""
        seconds = self.args.ingest_warm_up
        if seconds <= 0:
            return
        print(f"[warm-up] {variant.setup} distributor, {seconds:.0f}s, not recorded", file=sys.stderr, flush=True)
        pool = self.pools[variant.pool]
        run_wrk(self.url(bench, variant), seconds, self.connections(pool), "fixed", "warm", lambda: "warm-up",
                self.args.wrk_threads, pool=pool)
        bench.settle("distributor")

    def measure(self, bench: Bench, variant: Variant, round_no: int) -> dict[str, Any]:
        pool = self.pools[variant.pool]
        connections = self.connections(pool)
        url = self.url(bench, variant)
        extra: dict[str, Any] = {"variant": variant.name, "label": variant.label, "setup": variant.setup,
                                 "analyzer_compression": variant.compression, "url": url,
                                 "ingest_connections": connections,
                                 "content_type": pool.content_type, "content_encoding": pool.encoding or None}

        def load() -> RunResult:
            return run_wrk(url, self.args.duration, connections, "fixed", os.urandom(4).hex(), bench.progress,
                           self.args.wrk_threads, pool=pool)

        record = bench.measure(f"ingest:{variant.name}", "distributor", "fixed", load, extra, round_no=round_no)
        messages = record["check"].get("received_messages") or 0
        record["cpu_us_per_message"] = per_answer_us(record["cpu"], messages, False)
        body = record["check"].get("received_body_bytes")
        record["body_bytes_per_message_to_analyzers"] = None if body is None or not messages else body / messages
        return record

    def spans_after(self, before: int, timeout: float) -> bool:
        """Whether spans beyond ``before`` reached the receiver within ``timeout`` (exports leave every 5 s)."""
        try:
            wait_until(lambda: self.receiver.spans > before, timeout, "spans at the OTLP receiver", interval=0.2)
        except TimeoutError:
            return False
        return True

    @contextlib.contextmanager
    def started(self, variant: Variant) -> Iterator[Bench]:
        """A distributor of the variant's own setup, warmed up; stopped when the block ends."""
        with self.distributor(variant.setup) as cluster:
            bench = Bench(self.args, cluster, self.sinks, self.runs)
            before = self.receiver.spans
            self.warm_up(bench, variant)
            if variant.setup == "traced" and self.args.ingest_warm_up > 0:  # the warm-up's spans first, so that
                self.spans_after(before, 20)  # the run's are the run's
            yield bench

    def traced(self, variant: Variant, round_no: int) -> dict[str, Any]:
        """The traced run, then its spans: they leave the workers every 5 s and when the workers stop."""
        with self.started(variant) as bench:
            before, by_name = self.receiver.spans, dict(self.receiver.spans_by_name)
            record = self.measure(bench, variant, round_no)
        arrived = self.spans_after(before, 15)
        ingest_spans = self.receiver.spans_by_name.get("ingest", 0) - by_name.get("ingest", 0)
        requests = sum(record["by_status"].values())
        record["tracing"] = {
            "sample_ratio": self.args.trace_ratio, "receiver": self.receiver.url,
            "spans": self.receiver.spans - before, "ingest_spans": ingest_spans,
            "send_spans": self.receiver.spans_by_name.get("send", 0) - by_name.get("send", 0),
            "ingest_spans_per_request": ingest_spans / max(requests, 1)}
        check = record["check"]
        check["spans_received"] = arrived
        check["applied"] = [*check["applied"], "spans of the run reached the OTLP receiver"]
        check["passed"] = bool(check["passed"] and arrived)
        return record


def ingest_scenario(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every selected variant, ``--rounds`` times alternating; the summary of report["ingest"]."""
    missing = closed_loop_missing()
    if missing:
        return {"skipped": missing}
    selected = [v for v in VARIANTS if v.name in args.ingest_variants]
    skipped: dict[str, str] = {}
    print(f"[ingest] {', '.join(v.name for v in selected)}: {args.rounds} rounds, wrk, free analyzers",
          file=sys.stderr, flush=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, NginxSinks(WEIGHTS) as sinks, \
            TraceReceiver() as receiver, local_https():
        wants_tls = any(v.setup == "tls" for v in selected)
        certificate = make_certificate(Path(tmp)) if wants_tls else None
        if wants_tls and certificate is None:
            skipped["tls"] = "needs the openssl command to make a certificate"
            selected = [v for v in selected if v.setup != "tls"]
        run = IngestBench(args, Path(tmp), sinks, receiver, runs, certificate)
        pools = {name: {**pool_sizes(pool), "packets_per_request": pool.packets, "messages_per_packet": pool.messages,
                        "content_type": pool.content_type, "content_encoding": pool.encoding or None}
                 for name, pool in run.pools.items()}
        with run.distributor("plain") as cluster:
            plain = Bench(args, cluster, sinks, runs)
            run.warm_up(plain, VARIANTS[0])
            for round_no in range(1, args.rounds + 1):
                for variant in selected:
                    if variant.setup == "plain":
                        run.compress(plain, variant.compression)
                        records.append(run.measure(plain, variant, round_no))
                    elif variant.setup == "traced":
                        records.append(run.traced(variant, round_no))
                    else:
                        with run.started(variant) as bench:
                            records.append(run.measure(bench, variant, round_no))
        summary = summarize(records, [asdict(v) for v in selected])
        summary.update({"generator": generators.wrk_version() or "wrk", "workers": args.workers,
                        "rounds": args.rounds, "duration_s": args.duration, "sinks": "nginx",
                        "connections": {"single_packet": args.connections, "batch": run.batch_connections},
                        "trace_ratio": args.trace_ratio, "pools": pools, "skipped_variants": skipped,
                        "sinks_nginx_conf": sinks.config.read_text()})
    return summary
