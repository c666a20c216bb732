"""Run a function on N gloo ranks on 127.0.0.1, each in its own spawned process: the
multi-process tests (tests/dist) and the CPU benchmarks (benchmarks/token_exchange.py,
eplb_overlap.py, moe_layer_profile.py)."""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from tools.launch import free_port


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 300) -> None:
    """The default process group of this process: gloo over the loopback interface."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _entry(rank, world_size, port, fn, args, replies) -> None:
    init_gloo(rank, world_size, port)
    try:
        replies.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        replies.put((rank, False, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout_s: float = 600) -> list:
    """Call `fn(rank, world_size, *args)` (a module-level function) on every rank; return
    the ranks' return values in rank order, or raise with the first failing rank's
    traceback. A rank that neither returns nor fails within `timeout_s` is killed."""
    ctx = mp.get_context("spawn")
    replies = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, replies))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(values) < world_size:  # read before join: the queue's pipe is finite
            if not replies.empty():
                rank, ok, value = replies.get()
                if not ok:
                    raise AssertionError(f"rank {rank} failed:\n{value}")
                values[rank] = value
            elif time.monotonic() > deadline:
                raise AssertionError(
                    f"ranks {sorted(set(range(world_size)) - set(values))} "
                    f"did not finish within {timeout_s} s"
                )
            elif any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(1)  # a failing rank's traceback may still be on its way
                if replies.empty():
                    raise AssertionError(f"rank exit codes {[p.exitcode for p in procs]}")
            else:
                time.sleep(0.05)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world_size, f"rank exit codes {codes}"
    return [values[r] for r in range(world_size)]
