"""Policies users write: ``module:Class`` loads docs/POLICIES.md's worked example; bad specs are one clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bus.errors import PolicyError
from bus.policy import BandwidthPolicy, PolicyRequest, layer_costs, make_policy

EXAMPLE = "examples.policies:MeteredPhone"
SHAPE = (1, 3, 60, 64)
ROOT = Path(__file__).resolve().parents[2]


def _request(rate: float, **kw) -> PolicyRequest:
    return PolicyRequest(layers=layer_costs([1.0, 0.2, 0.5], SHAPE), link_rate_bps=rate, time_left_s=1.0, **kw)


def test_the_worked_example_loads_and_plans() -> None:
    policy = make_policy(EXAMPLE)
    assert isinstance(policy, BandwidthPolicy) and policy.name == "metered-phone"
    ample = policy.plan(_request(10e6))
    assert ample.precision == "int8" and ample.layers == (0, 2, 1)  # never fp16; most important first
    tight = policy.plan(_request(10e6, budget_bytes=ample.expected_bytes - 1))
    assert tight.precision == "int4" and len(tight.layers) == 3
    starved = policy.plan(_request(0.035e6))  # 28 KB by the deadline (80%): two layers at int4 (12.7 KB each)
    assert starved.precision == "int4" and starved.layers == (0, 2) and starved.dropped == (1,)
    capped = make_policy(EXAMPLE, max_bytes=1)
    assert capped.plan(_request(10e6)).items == ()
    assert policy.plan(_request(0.035e6, whole=True)).items == ()  # read only whole: two of three would be waste
    assert len(policy.plan(_request(10e6, whole=True)).items) == 3


def test_the_agents_knobs_reach_only_what_it_takes() -> None:
    policy = make_policy(EXAMPLE, ignore_unused=True, precision="fp16", reserve_s=0.25, assumed_rate_bps=1e6)
    assert policy.max_bytes > 0
    with pytest.raises(PolicyError, match="bad parameters for policy metered-phone"):
        make_policy(EXAMPLE, reserve_s=0.25)
    with pytest.raises(PolicyError, match="failed to start: max_bytes must be positive"):
        make_policy(EXAMPLE, max_bytes=0)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("no_such_module_xyz:Policy", "cannot import no_such_module_xyz"),
        ("examples.policies:Nope", "has no Nope"),
        ("examples.policies:link_budget", "not a subclass"),
        ("json:JSONDecoder", "not a subclass"),
        ("bus.policy:BandwidthPolicy", "does not implement plan"),
        ("examples.policies:", "expected module:Class"),
        (":MeteredPhone", "expected module:Class"),
        ("keep-everything", "unknown policy"),
    ],
)
def test_bad_specs(spec: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        make_policy(spec)


def test_a_bad_spec_on_the_command_line_is_one_line() -> None:
    cmd = [sys.executable, "-m", "agents.transmitter", "--model", "tiny-llama", "--insecure", "--policy", "nope:X"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --policy: policy 'nope:X': cannot import nope: No module named 'nope'"
    ]
