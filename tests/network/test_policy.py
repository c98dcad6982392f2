"""The ranking policy on synthetic fleets: filters, the score's order of terms, random ties, the
spreading of a hot adapter, and the decision time."""

from __future__ import annotations

import time
from collections import Counter

from openlora.network.policy import LeastLoaded, Policy, Prefs, RoundRobin
from openlora.network.view import NodeView


def fleet(n: int = 4, adapters: int = 200) -> list[NodeView]:
    out = []
    for i in range(n):
        v = NodeView(url=f"http://n{i}", address=f"0x{i:040x}", model="m", max_num_seqs=8, healthy=True,
                     adapters={f"a{j}": "disk" for j in range(adapters)}, region="FR" if i % 2 else "US",
                     price={"per_1k_completion_tokens": 100 * (i + 1)})
        out.append(v)
    return out


def test_resident_wins_then_load_spreads_a_hot_adapter():
    nodes = fleet()
    nodes[2].adapters["a0"] = "resident"
    p = Policy(seed=0)
    assert p.rank(nodes, "a0")[0] is nodes[2]
    nodes[2].inflight = 3  # 3/8 of its capacity: still the best place for a0
    assert p.rank(nodes, "a0")[0] is nodes[2]
    nodes[2].inflight = 5  # past about half: an idle node with a0 on disk is better now
    assert p.rank(nodes, "a0")[0] is not nodes[2]


def test_filters_unhealthy_dropped_saturated_and_missing_adapters():
    nodes = fleet()
    nodes[0].healthy = False
    nodes[1].dropped = "bad receipts"
    nodes[2].inflight = 16  # 2 x max_num_seqs
    assert [n.url for n in Policy(0).rank(nodes, "a1")] == ["http://n3"]
    del nodes[3].adapters["a1"]
    assert Policy(0).rank(nodes, "a1") == []
    assert [n.url for n in Policy(0).rank(nodes, "m")] == ["http://n3"]  # base model: any node


def test_soft_filters_region_and_price_are_skipped_when_they_would_empty_the_set():
    nodes = fleet()
    assert {n.region for n in Policy(0).rank(nodes, "a1", Prefs(region="FR"))} == {"FR"}
    assert len(Policy(0).rank(nodes, "a1", Prefs(region="JP"))) == 4
    assert [n.url for n in Policy(0).rank(nodes, "a1", Prefs(max_price=150))] == ["http://n0"]
    assert len(Policy(0).rank(nodes, "a1", Prefs(max_price=1))) == 4


def test_prefix_affinity_breaks_an_otherwise_even_choice():
    nodes = fleet()
    assert Policy(0).rank(nodes, "a5", Prefs(prefix_node="http://n3"))[0] is nodes[3]


def test_ties_are_random_not_first():
    nodes = fleet()
    for n in nodes:
        n.price = {}
    firsts = Counter(Policy(seed=s).rank(nodes, "a9")[0].url for s in range(200))
    assert len(firsts) == 4 and min(firsts.values()) > 20, firsts


def test_peers():
    nodes = fleet()
    rr = RoundRobin()
    assert [rr.rank(nodes, "a1")[0].url for _ in range(5)] == ["http://n0", "http://n1", "http://n2", "http://n3",
                                                               "http://n0"]
    nodes[0].inflight, nodes[1].inflight, nodes[2].inflight = 3, 1, 2
    assert LeastLoaded(0).rank(nodes, "a1")[0] is nodes[3]


def test_decision_time_is_well_under_a_millisecond():
    nodes = fleet(4, 200)
    p = Policy(0)
    times = []
    for i in range(2000):
        t0 = time.perf_counter()
        p.rank(nodes, f"a{i % 200}")
        times.append(time.perf_counter() - t0)
    times.sort()
    p99 = times[int(0.99 * len(times))]
    print(f"decision p50 {times[len(times) // 2] * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us")
    assert p99 < 1e-3
