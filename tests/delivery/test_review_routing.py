"""Review of the compiled routing arithmetic (distributor/delivery/_weighted_pick.c): regression tests.

Each runs the compiled ``best`` in a child interpreter, so a crash (SIGSEGV) shows as a failed test
instead of taking pytest down with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from distributor.delivery import routing

pytestmark = pytest.mark.skipif(routing._best is routing.best_index, reason="_weighted_pick is not built")

PRELUDE = textwrap.dedent("""
    import mmap
    from distributor.delivery._weighted_pick import best

    def counters(values):
        view = memoryview(mmap.mmap(-1, 8 * len(values))).cast("q")
        for i, value in enumerate(values):
            view[i] = value
        return view

    def attempt(*args):
        try:
            print(best(*args))
        except Exception as exc:
            print(type(exc).__name__, exc)
""")


def run_child(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=30)


def assert_refused(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode >= 0, (
        f"best() crashed the interpreter with signal {-result.returncode}; stderr: {result.stderr[-400:]}")
    assert result.returncode == 0 and result.stdout.startswith("TypeError"), (
        f"not refused as a TypeError: {result.stdout[-200:]} {result.stderr[-400:]}")


def test_best_does_not_crash_when_a_weights_float_conversion_empties_the_list() -> None:
    """PyFloat_AsDouble runs __float__, which may change ``weights``; the loop then reads the freed item array
    with the length it read before (PyList_GET_ITEM on a cleared list: NULL dereference)."""
    result = run_child("""
        weights = []
        class Weight:
            def __float__(self):
                weights.clear()
                return 0.5
        weights[:] = [Weight(), 0.25, 0.25]
        attempt(counters([0, 0, 0]), [0, 1, 2], [0, 0, 0], weights, 1)
    """)
    assert_refused(result)


def test_best_does_not_crash_when_an_offsets_index_conversion_empties_the_cells() -> None:
    """PyLong_AsLongLong runs __index__ of an offset, which may clear ``cells``: the next cell is read from freed
    (NULL) storage."""
    result = run_child("""
        cells = [0, 1, 2]
        class Offset:
            def __index__(self):
                cells.clear()
                return 0
        attempt(counters([0, 0, 0]), cells, [Offset(), 0, 0], [0.25, 0.25, 0.5], 1)
    """)
    assert_refused(result)


def test_best_does_not_crash_when_the_messages_index_conversion_empties_the_cells() -> None:
    """``messages`` is converted (its __index__ runs) after the length of ``cells`` was taken and checked."""
    result = run_child("""
        cells = [0, 1, 2]
        class Messages:
            def __index__(self):
                cells.clear()
                return 1
        attempt(counters([0, 0, 0]), cells, [0, 0, 0], [0.25, 0.25, 0.5], Messages())
    """)
    assert_refused(result)


def test_int_weights_are_refused_rather_than_scored_unlike_the_reference() -> None:
    """``list[float]`` admits ints (PEP 484); the reference then scores in exact integers, the C code would score
    in doubles, and near 2**53 they disagree: the compiled pick takes exact floats only (the router's weights)."""
    view = memoryview(bytearray(16)).cast("q")
    view[0], view[1] = 2**53 + 1, 2**53
    with pytest.raises(TypeError):
        routing._best(view, [0, 1], [0, 0], [1, 1], 0)
    assert routing._best(view, [0, 1], [0, 0], [0.5, 0.5], 0) == routing.best_index(view, [0, 1], [0, 0], [0.5, 0.5], 0)
