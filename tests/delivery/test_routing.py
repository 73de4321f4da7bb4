"""Properties of message-weighted routing (distributor.delivery.routing.pick)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from distributor.delivery.routing import NO_ANALYZER, pick

weights_st = st.lists(st.floats(min_value=0.01, max_value=100, allow_nan=False), min_size=1, max_size=8)
sizes_st = st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=400)


def normalise(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def route_all(weights: list[float], sizes: list[int]) -> list[list[int]]:
    """Route every packet; return the routed totals after each packet."""
    routed = [0] * len(weights)
    history = []
    for n in sizes:
        index = pick(routed, weights, n, lambda i: True)
        routed[index] += n
        history.append(list(routed))
    return history


@settings(max_examples=400, deadline=None)
@given(weights_st, sizes_st)
def test_no_analyzer_runs_ahead_of_its_share_by_a_packet(raw_weights: list[float], sizes: list[int]) -> None:
    weights = normalise(raw_weights)
    n_max = max(sizes)
    for routed in route_all(weights, sizes):
        total = sum(routed)
        for i, w in enumerate(weights):
            assert routed[i] - w * total <= n_max + 1e-6 * total


@settings(max_examples=400, deadline=None)
@given(weights_st, sizes_st)
def test_every_analyzer_stays_within_one_max_packet_of_its_share(raw_weights: list[float], sizes: list[int]) -> None:
    weights = normalise(raw_weights)
    n_max = max(sizes)
    for routed in route_all(weights, sizes):
        total = sum(routed)
        for i, w in enumerate(weights):
            assert abs(routed[i] - w * total) <= n_max + 1e-6 * total


def test_balances_messages_not_packets() -> None:
    """Equal weights, alternating 20- and 5-message packets: messages split evenly, packets do not."""
    weights = [0.5, 0.5]
    routed = [0, 0]
    packets = [0, 0]
    for n in [20, 5] * 1000:
        i = pick(routed, weights, n, lambda _: True)
        routed[i] += n
        packets[i] += 1
    assert abs(routed[0] - routed[1]) <= 20
    assert sum(routed) == 25_000


def test_full_queue_spills_to_next_best() -> None:
    weights = normalise([0.4, 0.3, 0.2, 0.1])
    routed = [0, 0, 0, 0]
    assert pick(routed, weights, 10, lambda i: True) == 0
    assert pick(routed, weights, 10, lambda i: i != 0) == 1
    assert pick(routed, weights, 10, lambda i: i not in (0, 1)) == 2
    assert pick(routed, weights, 10, lambda i: False) == NO_ANALYZER


@settings(max_examples=200, deadline=None)
@given(weights_st, sizes_st, st.data())
def test_spill_over_picks_the_best_analyzer_with_room(raw_weights: list[float], sizes: list[int], data: st.DataObject) -> None:
    weights = normalise(raw_weights)
    routed = [0] * len(weights)
    for n in sizes:
        full = data.draw(st.sets(st.integers(0, len(weights) - 1)))
        index = pick(routed, weights, n, lambda i: i not in full)
        if len(full) == len(weights):
            assert index == NO_ANALYZER
            continue
        total = sum(routed) + n
        scores = {i: weights[i] * total - routed[i] for i in range(len(weights)) if i not in full}
        assert index not in full and scores[index] == max(scores.values())
        routed[index] += n


def test_weights_need_not_sum_to_one_after_normalising() -> None:
    weights = normalise([4, 3, 2, 1])
    history = route_all(weights, [5, 20] * 2000)
    routed = history[-1]
    total = sum(routed)
    for i, w in enumerate(weights):
        assert abs(routed[i] / total - w) < 0.001
