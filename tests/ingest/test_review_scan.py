"""Review regressions for the packet contract's compiled fast path (distributor/ingest/_packet_scan.c).

The scanner's promise: it only ever agrees with ``parse_packet_python`` or returns None; it never
crashes, and for bad arguments raises TypeError only. ``parse_packet`` must answer as the reference.
"""

from __future__ import annotations

import array
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distributor.ingest import contract
from distributor.ingest.contract import ContractError, PacketInfo, parse_packet, parse_packet_python

BODY = b'{"emitter_id":"e","packet_id":"p","messages":[{"timestamp":1,"level":"i","message":"m"}]}'
REPO = Path(__file__).resolve().parents[2]


def answer(call: object) -> object:
    try:
        return call()  # type: ignore[operator]
    except ContractError as exc:
        return ("ContractError", exc.status, exc.field)
    except Exception as exc:  # noqa: BLE001 - the kind of failure is what is compared
        return (type(exc).__name__,)


@pytest.fixture()
def scan() -> object:
    if contract._scan is None:
        pytest.skip("the compiled scanner is not built")
    return contract._scan


def test_a_struct_sequence_result_type_does_not_crash_the_process(scan: object) -> None:
    # os.stat_result / time.struct_time pass the "tuple type" check; tuple's tp_new called directly
    # (bypassing tuple.__new__'s "is not safe" check) makes a 4-item struct sequence whose dealloc
    # reads n_fields (> 4) items: SIGSEGV.
    code = textwrap.dedent(f"""
        import gc, os, time
        from distributor.ingest.contract import _scan
        for t in (os.stat_result, time.struct_time):
            try:
                r = _scan({BODY!r}, 10, t)
            except TypeError:
                continue
            del r
            gc.collect()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"rc={proc.returncode} {proc.stderr[-300:]}"


@pytest.mark.parametrize("make", [
    lambda: array.array("B", BODY),
    lambda: type("BytesSub", (bytes,), {})(BODY),
    lambda: (lambda m: (m.write(BODY), m)[1])(mmap.mmap(-1, len(BODY))),
], ids=["array", "bytes-subclass", "mmap"])
def test_the_scanner_never_accepts_a_body_the_reference_refuses(scan: object, make: object) -> None:
    body = make()  # type: ignore[operator]
    expected = answer(lambda: parse_packet_python(body, 10))
    assert expected == ("ContractError", 400, "body")  # orjson takes bytes, bytearray, memoryview, str only
    assert answer(lambda: scan(body, 10, PacketInfo)) is None  # type: ignore[operator]
    assert answer(lambda: parse_packet(body, 10)) == expected


def test_parse_packet_answers_a_str_body_as_the_reference(scan: object) -> None:
    text = BODY.decode()
    assert answer(lambda: parse_packet(text, 10)) == parse_packet_python(text, 10)  # type: ignore[arg-type]


def test_parse_packet_answers_a_non_contiguous_view_as_the_reference(scan: object) -> None:
    view = memoryview(bytes(b for pair in zip(BODY, BODY) for b in pair))[::2]
    assert answer(lambda: parse_packet(view, 10)) == answer(lambda: parse_packet_python(view, 10))  # type: ignore[arg-type]
    assert answer(lambda: scan(view, 10, PacketInfo)) in (None, ("TypeError",))  # type: ignore[operator]


@pytest.mark.parametrize("max_messages", [2**63, 10.0], ids=["beyond-ssize_t", "float"])
def test_parse_packet_answers_any_max_messages_as_the_reference(scan: object, max_messages: object) -> None:
    assert answer(lambda: parse_packet(BODY, max_messages)) == parse_packet_python(BODY, max_messages)  # type: ignore[arg-type]


def test_the_scanner_raises_only_type_error_for_bad_arguments(scan: object) -> None:
    for args in ((BODY, 2**63, PacketInfo), (memoryview(BODY * 2)[::2], 10, PacketInfo)):
        expected = answer(lambda: parse_packet_python(args[0], args[1]))  # type: ignore[arg-type]
        assert answer(lambda: scan(*args)) in (None, ("TypeError",), expected), args  # type: ignore[operator]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("apt-get"), reason="venv.sh only installs gcc as root with apt-get")
def test_venv_sh_without_a_compiler_or_apt_access_still_makes_the_venv(tmp_path: Path) -> None:
    # A root machine with no C compiler whose apt mirrors are unreachable (a real apt-get, offline through an
    # unreachable proxy, with empty lists and dpkg status): the install must still work, in pure Python.
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "venv.sh", project / "scripts" / "venv.sh")
    apt = tmp_path / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True)
    (apt / "status").write_text("")
    (apt / "apt.conf").write_text(
        'Acquire::http::Proxy "http://127.0.0.1:9";\nAcquire::https::Proxy "http://127.0.0.1:9";\n'
        f'Acquire::Retries "0";\nDir::State::lists "{apt}/lists";\nDir::State::status "{apt}/status";\n'
        f'Dir::Cache "{apt}/cache";\n')
    shim = tmp_path / "bin"  # the usual tools, but no cc / gcc
    shim.mkdir()
    for tool in ("bash", "env", "dirname", "id", "apt-get"):
        (shim / tool).symlink_to(shutil.which(tool))  # type: ignore[arg-type]
    (shim / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {"PATH": str(shim), "APT_CONFIG": str(apt / "apt.conf"), "PIP_NO_INDEX": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([str(shim / "bash"), "scripts/venv.sh"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert (project / ".venv" / "bin" / "python").exists(), (
        f"venv.sh stopped at the compiler step (rc={proc.returncode}): {proc.stderr[-300:]}")
