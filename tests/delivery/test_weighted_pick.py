"""The compiled routing arithmetic (``_weighted_pick.best``) gives the reference's index (``routing.best_index``)."""

from __future__ import annotations

import array
import mmap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributor.delivery import routing
from distributor.delivery.routing import NO_ANALYZER, best_index, pick


def compiled() -> Any:
    assert routing._best is not best_index, "distributor.delivery._weighted_pick is not built: is a C compiler installed?"
    return routing._best


def counters(values: list[int]) -> memoryview:
    """An int64 view over shared memory, as the shared table's."""
    buf = mmap.mmap(-1, max(8, 8 * len(values)))
    view = memoryview(buf).cast("q")
    for i, value in enumerate(values):
        view[i] = value
    return view


def test_the_extension_is_built() -> None:
    compiled()


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_the_compiled_pick_agrees_with_the_reference(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 12))
    raw = data.draw(st.lists(st.floats(0.001, 1000, allow_nan=False), min_size=n, max_size=n))
    weights = [w / sum(raw) for w in raw]
    values = data.draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n + 4))
    cells = data.draw(st.lists(st.integers(0, len(values) - 1), min_size=n, max_size=n))
    offsets = data.draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n))
    messages = data.draw(st.integers(1, 10_000))
    view = counters(values)
    assert compiled()(view, cells, offsets, weights, messages) == best_index(view, cells, offsets, weights, messages)


def test_ties_go_to_the_first_like_pick() -> None:
    view = counters([0, 0, 0])
    weights = [1 / 3] * 3
    assert compiled()(view, [0, 1, 2], [0, 0, 0], weights, 5) == 0 == pick([0, 0, 0], weights, 5, lambda i: True)
    assert compiled()(view, [0, 1, 2], [7, 0, 0], weights, 5) == 1  # the first one ran ahead


def test_no_candidate() -> None:
    assert compiled()(counters([]), [], [], [], 10) == NO_ANALYZER == best_index(counters([]), [], [], [], 10)


def test_bad_arguments_raise_instead_of_reading_out_of_bounds() -> None:
    best = compiled()
    view = counters([1, 2])
    with pytest.raises(IndexError):
        best(view, [0, 2], [0, 0], [0.5, 0.5], 1)
    with pytest.raises(IndexError):
        best(view, [-1, 0], [0, 0], [0.5, 0.5], 1)
    with pytest.raises(ValueError):
        best(view, [0, 1], [0], [0.5, 0.5], 1)
    with pytest.raises(TypeError):
        best(view, (0, 1), [0, 0], [0.5, 0.5], 1)
    with pytest.raises(TypeError):
        best(memoryview(array.array("i", [1, 2])), [0, 1], [0, 0], [0.5, 0.5], 1)  # not int64
    with pytest.raises(TypeError):
        best(view, [0, 1], [0, 0], [0.5, "x"], 1)
    with pytest.raises(TypeError):
        best(view, [0, 1], [0, 0], [0.5, 0.5])
    with pytest.raises(OverflowError):
        best(counters([2**62, 2**62]), [0, 1], [2**62, 2**62], [0.5, 0.5], 1)
