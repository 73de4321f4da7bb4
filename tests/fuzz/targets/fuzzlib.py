"""What every atheris target shares: instrumentation only when run as a fuzzer, and the entry point.

A target is a script ``fuzz_<name>.py`` with a ``check(data: bytes) -> None`` that raises
(AssertionError or anything unexpected) when an invariant breaks. Run as a script it is a
libFuzzer binary (``python fuzz_x.py -atheris_runs=N CORPUS_DIR``; see scripts/fuzz.sh); imported
(tests/fuzz/test_fuzz.py) its ``check`` replays inputs in-process without instrumentation.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, ContextManager

import atheris

TARGETS = Path(__file__).resolve().parent
DICTS = TARGETS.parent / "dicts"
if str(TARGETS.parents[1]) not in sys.path:  # tests/: helpers shared with the suite (run as a script)
    sys.path.append(str(TARGETS.parents[1]))


def fuzzing() -> bool:
    """True when this process is an atheris target run as a script (``__main__`` is a file in this folder)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is not None and Path(path).resolve().parent == TARGETS


def instrumented(*packages: str) -> ContextManager[object]:
    """``with instrumented("distributor"): import ...``: coverage-instrument these imports when fuzzing."""
    if not fuzzing():
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=list(packages) or ["distributor"])


def main(check: Callable[[bytes], None], dictionary: str | None = None) -> None:
    """Hand ``check`` to libFuzzer with the command line's flags and corpus directories.

    Adds, unless the command line sets them: the target's token dictionary (tests/fuzz/dicts/), and
    a 10 s limit per input so a hang is a finding too.
    """
    argv = list(sys.argv)
    flags = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")]
    if dictionary and "-dict" not in flags:
        argv.insert(1, f"-dict={DICTS / dictionary}.dict")
    if "-timeout" not in flags:
        argv.insert(1, "-timeout=10")
    atheris.Setup(argv, check)
    atheris.Fuzz()
