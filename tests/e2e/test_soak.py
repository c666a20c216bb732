"""The soak benchmark's short form (benchmarks/soak.py): a DP 2 wide-EP server rebalancing
every 4 steps serves 64 streamed greedy requests at concurrency 32, mixed prompt and output
lengths, 10 % of the clients hanging up mid-stream; every finished request is stock vLLM's
output. Then the same requests again with a bad expert transfer injected on every EP rank
(`wideep_fault_drill`): the group refuses that move, counts it, and serving is unchanged.
"""

from __future__ import annotations

import pytest

from benchmarks.soak import soak, soak_requests, table

pytestmark = pytest.mark.slow

REQUESTS = 64
CONCURRENCY = 32
DISCONNECT_FRACTION = 0.1
# Resident memory may move by allocator noise during a run, not grow with the requests
# served: at most this fraction above the run's start.
RSS_GROWTH = 0.05


@pytest.fixture(scope="module")
def runs(tiny_model):
    requests = soak_requests(REQUESTS, DISCONNECT_FRACTION, seed=0)
    results = soak(tiny_model("qwen3_moe"), "float32", requests, CONCURRENCY)
    print(table(results))
    return {run.name: run for run in results}


@pytest.mark.parametrize("name", ["clean", "bad transfer"])
def test_every_finished_request_is_stock_output(runs, name):
    run = runs[name]
    assert run.requests == REQUESTS
    assert run.errors == 0 and run.mismatches == 0, run.problems
    assert run.disconnects == round(REQUESTS * DISCONNECT_FRACTION)
    assert run.rss_end_mib <= run.rss_start_mib * (1 + RSS_GROWTH), run


def test_clean_run_rebalances_without_failures(runs):
    clean = runs["clean"]
    assert clean.rebalances > 0 and clean.failures == 0, clean


def test_bad_transfer_is_refused_and_counted(runs):
    """Every rank was armed; a rank whose next move received nothing stays armed for a
    later one, so one or two moves are refused, each counted once."""
    bad = runs["bad transfer"]
    assert 1 <= bad.failures <= 2, bad
    assert bad.rebalances > 0, bad  # the other moves still go through
