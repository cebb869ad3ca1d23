"""Bandwidth policies: budgets respected, importance order kept, never empty when something fits, clear errors."""

from __future__ import annotations

import math
import random

import pytest

from bus.errors import PolicyError
from bus.policy import (
    FRAME_OVERHEAD_BYTES,
    POLICIES,
    BandwidthPolicy,
    DeadlineAware,
    LayerCost,
    PolicyRequest,
    decide,
    layer_costs,
    layer_wire_bytes,
    link_budget,
    make_policy,
    plan_whole,
    split_budget,
)
from bus.schemas import expected_raw_bytes

SHAPE = (1, 8, 128, 128)  # Qwen3-0.6B-like layer at 128 tokens
IMPORTANCE = [0.1, 0.9, 0.0, 0.5, 0.7, 0.3, 0.2, 0.8]


def request(**kw) -> PolicyRequest:
    kw.setdefault("layers", layer_costs(IMPORTANCE, SHAPE))
    return PolicyRequest(**kw)


def fp16_layer() -> int:
    return layer_wire_bytes(SHAPE, "fp16")


def test_wire_bytes_are_raw_plus_frame_overhead():
    raw = 2 * 8 * 128 * 128 * 2  # K and V at 2 bytes
    assert layer_wire_bytes(SHAPE, "fp16") == raw + 2 * FRAME_OVERHEAD_BYTES
    k8 = expected_raw_bytes(SHAPE, "int8", "channel")
    v8 = expected_raw_bytes(SHAPE, "int8", "token")
    assert layer_wire_bytes(SHAPE, "int8") == k8 + v8 + 2 * FRAME_OVERHEAD_BYTES
    assert layer_wire_bytes(SHAPE, "int4") < layer_wire_bytes(SHAPE, "int8") < layer_wire_bytes(SHAPE, "fp16")
    # a tensor larger than one message pays one header per chunk
    big = (1, 8, 4096, 128)
    assert layer_wire_bytes(big, "fp16", max_payload=1 << 20) > 2 * 2 * 8 * 4096 * 128 + 2 * 8 * FRAME_OVERHEAD_BYTES


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_sends_most_important_first(name):
    plan = make_policy(name).plan(request(budget_bytes=10**9, link_rate_bps=1e9, time_left_s=10.0))
    imps = [i.importance for i in plan.items]
    assert imps == sorted(imps, reverse=True)
    assert plan.layers[0] == 1  # importance 0.9
    assert len(plan.items) == len(IMPORTANCE)
    assert plan.expected_bytes == sum(i.bytes for i in plan.items)
    assert len({i.precision for i in plan.items}) == 1


def test_keep_all_ignores_budgets():
    plan = make_policy("keep-all").plan(request(budget_bytes=1))
    assert len(plan.items) == len(IMPORTANCE) and plan.precision == "fp16" and plan.dropped == ()


@pytest.mark.parametrize("n_fit", [1, 3, 5, 7])
def test_drop_respects_budget_and_keeps_the_most_important(n_fit):
    budget = n_fit * fp16_layer() + fp16_layer() // 2
    plan = make_policy("drop-by-importance").plan(request(budget_bytes=budget))
    assert plan.expected_bytes <= budget
    ranked = sorted(range(len(IMPORTANCE)), key=lambda i: (-IMPORTANCE[i], i))
    assert list(plan.layers) == ranked[:n_fit]
    assert list(plan.dropped) == ranked[n_fit:]


def test_drop_skips_a_big_layer_for_a_smaller_one_that_fits():
    layers = (
        LayerCost(layer=0, importance=0.9, bytes={"fp16": 1000}),
        LayerCost(layer=1, importance=0.5, bytes={"fp16": 100}),
    )
    plan = make_policy("drop").plan(PolicyRequest(layers=layers, budget_bytes=500, precisions=("fp16",)))
    assert plan.layers == (1,)


def test_ladder_degrades_precision_before_dropping():
    n = len(IMPORTANCE)
    costs = layer_costs(IMPORTANCE, SHAPE)
    total = {p: sum(c.bytes[p] for c in costs) for p in ("fp16", "int8", "int4")}
    ladder = make_policy("precision-ladder")
    assert ladder.plan(request(budget_bytes=total["fp16"])).precision == "fp16"
    plan = ladder.plan(request(budget_bytes=total["fp16"] - 1))
    assert plan.precision == "int8" and len(plan.items) == n
    plan = ladder.plan(request(budget_bytes=total["int8"] - 1))
    assert plan.precision == "int4" and len(plan.items) == n
    plan = ladder.plan(request(budget_bytes=total["int4"] - 1))
    assert plan.precision == "int4" and len(plan.items) == n - 1 and plan.dropped == (2,)  # importance 0.0 goes
    assert plan.expected_bytes <= total["int4"] - 1


def test_ladder_honours_the_senders_precisions():
    costs = layer_costs(IMPORTANCE, SHAPE, precisions=("fp16", "int8"))
    plan = make_policy("ladder").plan(
        PolicyRequest(layers=costs, budget_bytes=3 * fp16_layer(), precisions=("fp16", "int8"))
    )
    assert plan.precision == "int8" and plan.expected_bytes <= 3 * fp16_layer()


@pytest.mark.parametrize("name", ["drop-by-importance", "precision-ladder", "deadline-aware"])
def test_never_empty_when_the_cheapest_layer_fits(name):
    cheapest = min(c.bytes[p] for c in layer_costs(IMPORTANCE, SHAPE) for p in ("fp16", "int8", "int4"))
    params = {"safety": 1.0} if name == "deadline-aware" else {}
    policy = make_policy(name, **params)
    if name == "drop-by-importance":
        cheapest = fp16_layer()
    plan = policy.plan(request(budget_bytes=cheapest, link_rate_bps=cheapest * 10.0, time_left_s=1.0))
    assert len(plan.items) == 1 and plan.layers == (1,)
    empty = policy.plan(request(budget_bytes=cheapest - 1, link_rate_bps=cheapest * 10.0, time_left_s=1.0))
    assert empty.items == () and empty.expected_bytes == 0


def test_random_requests_never_break_the_rules():
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randint(1, 12)
        layers = tuple(
            LayerCost(
                layer=i,
                importance=rng.random(),
                bytes={"fp16": (b := rng.randint(10, 5000)), "int8": b // 2 + 1, "int4": b // 4 + 1},
            )
            for i in range(n)
        )
        budget = rng.randint(0, 30000)
        req = PolicyRequest(layers=layers, budget_bytes=budget, link_rate_bps=rng.uniform(1e2, 1e5), time_left_s=0.5)
        for name in ("drop-by-importance", "precision-ladder", "deadline-aware"):
            plan = make_policy(name).plan(req)
            assert plan.expected_bytes <= (plan.budget_bytes or 0) <= budget
            imps = [i.importance for i in plan.items]
            assert imps == sorted(imps, reverse=True)
            usable = ("fp16",) if name == "drop-by-importance" else ("fp16", "int8", "int4")
            if not plan.items:  # empty only when no single layer fits at any precision the policy may use
                assert all(c.bytes[p] > plan.budget_bytes for c in layers for p in usable)
            assert set(plan.layers) | set(plan.dropped) == set(range(n))


def test_deadline_aware_meets_the_deadline_given_an_accurate_rate():
    rate = 1_000_000.0  # bytes/s
    for time_left in (0.05, 0.2, 0.5, 1.0, 3.0):
        plan = DeadlineAware(safety=0.9, reserve_s=0.01).plan(
            request(link_rate_bps=rate, time_left_s=time_left, rtt_s=0.002)
        )
        assert plan.expected_seconds is not None
        assert plan.expected_seconds <= time_left - 0.01
        if plan.items:
            assert plan.expected_bytes <= 0.9 * rate * (time_left - 0.002 - 0.01)
    # plenty of time: everything at full precision
    plan = DeadlineAware().plan(request(link_rate_bps=rate, time_left_s=100.0))
    assert plan.precision == "fp16" and plan.dropped == ()


def test_deadline_aware_counts_backlog_and_the_plans_cap():
    base = request(link_rate_bps=1e6, time_left_s=1.0)
    free = DeadlineAware(safety=1.0).budget(base)
    assert free == 1_000_000
    assert (
        DeadlineAware(safety=1.0).budget(request(link_rate_bps=1e6, time_left_s=1.0, backlog_bytes=400_000)) == 600_000
    )
    assert DeadlineAware(safety=1.0).budget(request(link_rate_bps=1e6, time_left_s=1.0, budget_bytes=1234)) == 1234


def test_link_budget_and_split_budget():
    assert link_budget(1000.0, 2.0, rtt_s=0.5, safety=1.0) == 1500
    assert link_budget(1000.0, 0.1, rtt_s=0.5) == 0
    assert split_budget(1000, {"a": 3.0, "b": 1.0, "c": 0.0}) == {"a": 750, "b": 250, "c": 0}
    assert split_budget(1000, {"a": 0.0}) == {"a": 0}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"link_rate_bps": -1.0}, "link_rate_bps"),
        ({"link_rate_bps": math.nan}, "link_rate_bps"),
        ({"time_left_s": 0.0}, "time_left_s"),
        ({"time_left_s": -2.0}, "time_left_s"),
        ({"budget_bytes": -5}, "budget_bytes"),
        ({"backlog_bytes": -1}, "backlog_bytes"),
        ({"precisions": ("fp12",)}, "fp12"),
        ({"layers": ()}, "layers"),
    ],
)
def test_nonsense_requests_are_one_line_policy_errors(kw, match):
    with pytest.raises(PolicyError, match=match) as info:
        request(**kw)
    assert "\n" not in str(info.value)


def test_nonsense_layers_are_policy_errors():
    with pytest.raises(PolicyError, match="importance"):
        LayerCost(layer=0, importance=math.nan, bytes={"fp16": 10})
    with pytest.raises(PolicyError, match="importance"):
        LayerCost(layer=0, importance=-1.0, bytes={"fp16": 10})
    with pytest.raises(PolicyError, match="positive"):
        LayerCost(layer=0, importance=1.0, bytes={"fp16": 0})
    with pytest.raises(PolicyError, match="twice"):
        PolicyRequest(layers=[LayerCost(layer=0, importance=1.0, bytes={"fp16": 1})] * 2, precisions=("fp16",))
    with pytest.raises(PolicyError, match="no size for precision int8"):
        PolicyRequest(layers=[LayerCost(layer=0, importance=1.0, bytes={"fp16": 1})])
    with pytest.raises(PolicyError, match="importance scores"):
        layer_costs([1.0, 2.0], SHAPE, layers=[0])
    with pytest.raises(PolicyError, match="shape"):
        layer_wire_bytes((1, 0, 4, 4), "fp16")


def test_unknown_names_and_bad_parameters():
    with pytest.raises(PolicyError, match="unknown policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(PolicyError, match="bad parameters"):
        make_policy("keep-all", safety=0.5)
    with pytest.raises(PolicyError, match="precision"):
        make_policy("drop", precision="fp8")
    with pytest.raises(PolicyError, match="safety"):
        make_policy("deadline", safety=0.0)
    with pytest.raises(PolicyError, match="reserve_s"):
        make_policy("deadline", reserve_s=-1.0)
    with pytest.raises(PolicyError, match="needs a link rate"):
        make_policy("deadline").plan(request(time_left_s=1.0))
    with pytest.raises(PolicyError, match="needs the time left"):
        make_policy("deadline").plan(request(link_rate_bps=1e6))
    with pytest.raises(PolicyError, match="not among"):
        make_policy("keep-all", precision="fp32").plan(request())


def test_factory_aliases_and_decide():
    assert isinstance(make_policy("Deadline"), DeadlineAware)
    assert all(isinstance(make_policy(n), BandwidthPolicy) for n in POLICIES)
    plan = decide("deadline", layers=layer_costs([0.2, 0.8], SHAPE), link_rate_bps=1e6, time_left_s=1.0)
    assert plan.policy == "deadline-aware" and plan.pairs()[0][0] == 1
    lenient = make_policy("ladder", ignore_unused=True, precision="fp16", safety=0.5, ladder=("int8", "int4"))
    assert lenient.ladder == ("int8", "int4")
    with pytest.raises(PolicyError, match="unknown policy"):
        make_policy("nope", ignore_unused=True)
    assume = make_policy("deadline", assumed_rate_bps=1e6).plan(request(time_left_s=1.0))
    assert 0 < assume.expected_bytes <= 0.8e6


@pytest.mark.parametrize("name", ["drop-by-importance", "precision-ladder", "deadline-aware"])
def test_a_whole_request_gets_every_layer_or_none(name):
    """A cache the receiver reads only whole: every layer at the best precision that fits, or nothing."""
    every = len(IMPORTANCE)
    int4_all = sum(layer_wire_bytes(SHAPE, "int4") for _ in IMPORTANCE)
    kw = dict(link_rate_bps=1e6, time_left_s=1000.0)  # deadline-aware: a budget far above the plan's cap
    for budget, fits in ((int4_all, True), (int4_all - 1, False)):
        plan = make_policy(name).plan(request(budget_bytes=budget, whole=True, **kw))
        if name == "drop-by-importance":  # one precision (fp16): the whole cache never fits an int4 budget
            fits = False
        assert len(plan.items) == (every if fits else 0), (name, budget, plan)
        thinned = make_policy(name).plan(request(budget_bytes=budget, **kw))
        assert 0 < len(thinned.items)  # without whole the same budget keeps some layers


def test_plan_whole_holds_a_users_policy_to_whole_requests():
    class KeepsTwo(BandwidthPolicy):
        name = "keeps-two"

        def plan(self, req):
            return self.finish(req, make_policy("keep-all").plan(req).items[:2], None)

    req = request(whole=True)
    assert len(KeepsTwo().plan(req).items) == 2
    assert plan_whole(KeepsTwo(), req).items == ()
    assert len(plan_whole(KeepsTwo(), request()).items) == 2
