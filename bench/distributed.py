"""The benchmark under torchrun, for ops whose providers communicate (``Op.collective``, e.g. context
parallelism)::

    torchrun --nproc-per-node 4 -m bench --op ring_attention,lasp2_attention     # 4 ranks (GPUs, else CPUs)
    python -m bench --op ring_attention                                          # a group of one rank

Every rank runs the same cases in the same order. Collective calls must match across ranks, so what the
generic runner decides locally is agreed on here: the number of timed calls (from the slowest rank's
estimate) and each correctness verdict (the worst rank's). Each rank writes its own results files
(``<sweep>-rank<r>of<P>``); rank 0 prints the table. Each timed call counts as its slowest rank's time.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import measure

TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    world: int = 1

    @property
    def suffix(self) -> str:
        """Results-file suffix of this rank ("" outside torchrun)."""
        return f"-rank{self.rank}of{self.world}" if self.world > 1 else ""


def launch() -> Launch:
    """Join the group torchrun set up (``WORLD_SIZE`` etc. in the environment), on this rank's GPU if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Launch()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return Launch(dist.get_rank(), dist.get_world_size())


def default_group(device: torch.device):
    """The default process group, made as a group of one when the benchmark runs outside torchrun."""
    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="flashops-bench-"), "store")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0,
                                world_size=1, timeout=TIMEOUT)
    return dist.group.WORLD


def _worst(values: list, device: torch.device) -> list:
    """The elementwise maximum of ``values`` (the same length on every rank) over the ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def agreed_samples(fn: Callable, device: torch.device, timing: measure.Timing) -> measure.Samples:
    """Wall-clock times of ``fn`` (synchronized), with a call count every rank agrees on (from the slowest
    rank's estimate); each timed call counts as the slowest rank's time for it."""
    fn()  # compile, allocate
    measure.synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        fn()
    measure.synchronize(device)
    estimate_ms = _worst([(time.perf_counter() - start) * 1e3 / 3], device)[0]
    for _ in range(int(timing.warmup_ms / max(estimate_ms, 1e-3))):
        fn()
    reps = min(timing.max_reps, max(timing.min_reps, int(timing.rep_ms / max(estimate_ms, 1e-3))))
    times = []
    for _ in range(reps):
        measure.synchronize(device)
        start = time.perf_counter()
        fn()
        measure.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return measure.Samples(_worst(times, device))


def time_collective(fns: dict, device: torch.device, timing: measure.Timing) -> tuple:
    """``measure.time_interleaved``'s contract for collective ops: every rank times the same calls in the same
    order, one function after the other (interleaving would let the ranks' call counts differ and deadlock).
    A function that raises is not retried; the ranks agreed on the checks before, so all of them see it."""
    samples, failures = {}, {}
    for key, fn in fns.items():
        try:
            samples[key] = agreed_samples(fn, device, timing)
        except Exception as error:  # noqa: BLE001 - reported per function by the caller
            failures[key] = error
    return samples, failures


def agree(op, check: measure.Check) -> measure.Check:
    """For a collective op, every rank adopts the check of the rank that fared worst (so that all ranks go on
    to time, or skip, the same modes)."""
    if not op.collective or not dist.is_initialized() or dist.get_world_size() == 1:
        return check
    badness = max((c.error / c.bound if c.bound > 0 else float("inf") for c in check.forward + check.backward),
                  default=0.0) + (float("inf") if check.missing else 0.0)
    checks = [None] * dist.get_world_size()
    dist.all_gather_object(checks, (badness, dist.get_rank(), check))
    return max(checks, key=lambda entry: entry[:2])[2]
