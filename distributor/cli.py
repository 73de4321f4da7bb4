"""``distributor`` command line: serve, check-config, status, admin, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Sequence

import uvloop

from distributor.config import AnalyzerConfig, Config, ConfigError, resolve
from distributor.delivery.state_file import check_writable, load_state
from distributor.logs import setup_logging

EXIT_CONFIG = 2


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--listen", metavar="HOST:PORT", help="data port (default 0.0.0.0:8080)")
    parser.add_argument("--admin-listen", metavar="HOST:PORT", help="control plane (default 127.0.0.1:9091)")
    parser.add_argument("--workers", type=int, metavar="N", help="worker processes (default: CPU count)")
    parser.add_argument(
        "--analyzer", action="append", default=[], metavar="NAME=URL@WEIGHT",
        help="analyzer (repeatable; replaces the file's analyzers); weights are normalised",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override any other key, e.g. --set queue.max_packets=5000",
    )


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    """Defaults < TOML < environment < CLI flags, validated."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    if args.listen:
        top["listen"] = args.listen
    if args.admin_listen:
        top["admin_listen"] = args.admin_listen
    if args.workers is not None:
        top["workers"] = args.workers
    if args.analyzer:
        top["analyzers"] = [_analyzer_table(AnalyzerConfig.parse_flag(text)) for text in args.analyzer]
    for item in args.set:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep:
            raise ConfigError(f"--set: expected SECTION.KEY=VALUE or KEY=VALUE, got {item!r}")
        if dot:
            sections.setdefault(section, {})[name] = value
        else:
            top[section] = value
    return resolve(args.config, os.environ if environ is None else environ, top, sections)


def _analyzer_table(analyzer: AnalyzerConfig) -> dict[str, Any]:
    return {"name": analyzer.name, "url": analyzer.url, "weight": analyzer.weight, "mode": analyzer.mode}


def _check_state_file(config: Config) -> None:
    """The state file is read with the configuration at every start and reload: a bad one is a bad config."""
    load_state(config.admin.state_file, config.analyzer_rules).apply(config.analyzers)


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_writable(config.admin.state_file)  # an admin change must not fail later for want of a directory
    _check_state_file(config)
    setup_logging(config.log_format, "supervisor")
    from distributor.control.server import start_control_plane
    from distributor.ingest.listener import PortInUse
    from distributor.supervisor import SignalInbox, Supervisor

    inbox = SignalInbox()
    inbox.install_early()  # from here on a signal is queued, never the default action
    logger = logging.getLogger("distributor")

    async def run() -> int:
        try:
            supervisor = Supervisor(config, reload_config=lambda: config_from_args(args))
        except PortInUse as exc:
            logger.error("%s", exc.strerror)
            return EXIT_CONFIG
        except ConfigError as exc:
            logger.error("%s", exc)
            return EXIT_CONFIG
        try:
            runner = await start_control_plane(supervisor)
        except OSError as exc:
            supervisor.close()
            logger.error("cannot listen on admin address %s: %s", config.admin_listen, exc.strerror)
            return EXIT_CONFIG
        try:
            return await supervisor.run(inbox)
        finally:
            await runner.cleanup()

    code = uvloop.run(run())
    for handled in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, signal.SIG_IGN)  # stopped already: a late signal must not change the exit code
    return code


def _check_config(args: argparse.Namespace) -> int:
    args.listen = args.admin_listen = args.workers = None
    args.analyzer, args.set = [], []
    config = config_from_args(args)
    _check_state_file(config)  # its directory is not checked: check-config may run on another machine
    names = ", ".join(f"{a.name}={a.url}@{a.weight:g}" for a in config.analyzers)
    print(f"configuration {args.config} is valid: {config.workers} workers, listen {config.listen}, {names}")
    if config.wal.dir:
        from distributor.wal.inspect import verify

        problems = verify(config.wal.dir)
        for problem in problems:
            print(problem)
        print(f"write-ahead log {config.wal.dir}: " + (f"{len(problems)} problems (distributor wal inspect "
                                                        f"{config.wal.dir})" if problems else "clean"))
        if problems:
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distributor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the supervisor and its worker pool")
    _add_config_flags(serve)
    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config", metavar="FILE")
    status = commands.add_parser("status", help="print the worker and analyzer tables of a running distributor")
    from distributor.control.status import add_status_flags, run_status

    add_status_flags(status)
    admin = commands.add_parser("admin", help="drain, undrain, reweight, add or remove an analyzer (admin API)")
    from distributor.control.admin_cli import add_admin_flags, run_admin

    add_admin_flags(admin)
    wal = commands.add_parser("wal", help="inspect or verify a write-ahead log directory (read only)")
    from distributor.control.wal_cli import add_wal_flags, run_wal

    add_wal_flags(wal)
    demo = commands.add_parser("demo", help="4 local analyzers + the distributor + emitter load, live table")
    from distributor.tools.demo import add_demo_flags

    add_demo_flags(demo)
    commands.add_parser("bench", add_help=False, help="benchmark on 127.0.0.1; same flags as python -m loadtest.bench")
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        # every flag belongs to the benchmark, so it parses them itself
        from loadtest.bench import main as bench_main

        return bench_main(arguments[1:])
    args = parser.parse_args(arguments)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "status":
            return run_status(args)
        if args.command == "admin":
            return run_admin(args)
        if args.command == "wal":
            return run_wal(args)
        from distributor.tools.demo import run_demo

        return run_demo(args)
    except ConfigError as exc:
        # one line even when a bad key or value holds a newline or an escape sequence
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))
        print(f"distributor: invalid configuration: {text}", file=sys.stderr)
        return EXIT_CONFIG

