"""Run test scenarios on every rank of a freshly spawned process group (gloo on CPUs, NCCL on GPUs).

One spawn per group runs many scenarios (each process pays torch's import once): a scenario is a module-level
function ``check_x(rank, world)`` of an importable module; it raises to fail. The first failure ends that
rank (its peers would wait for collectives that never come), ``torch.multiprocessing`` then ends the others,
and scenarios not reached report "not run". Every collective has a timeout and the whole launch a deadline,
so a failing rank never hangs the suite.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

COLLECTIVE_TIMEOUT_S = 60


def _worker(rank: int, world: int, backend: str, folder: str, module: str, scenarios: list) -> None:
    torch.set_num_threads(1)
    if os.environ.get("FLASHOPS_RECORD_LAUNCHES") and os.environ.get("TRITON_INTERPRET") == "1":
        from tests.tools.triton_launches import install_recorder

        install_recorder(os.environ["FLASHOPS_RECORD_LAUNCHES"])
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:  # the Triton interpreter is slow: scenarios that want the Triton kernels on CPUs ask for them
        os.environ.setdefault("FLASHOPS_BACKEND", "torch")
    dist.init_process_group(backend, init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    functions = importlib.import_module(module)
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as log:
        for name in scenarios:
            try:
                getattr(functions, name)(rank, world)
            except BaseException:
                log.write(json.dumps({"scenario": name, "error": traceback.format_exc()}) + "\n")
                raise
            log.write(json.dumps({"scenario": name, "error": None}) + "\n")
            log.flush()
    dist.destroy_process_group()


def run(module: str, scenarios: list, world: int, *, backend: str = "gloo", deadline_s: float = 300) -> dict:
    """Run ``scenarios`` (names of functions in ``module``) on ``world`` processes; returns
    ``{scenario: None (passed) or the error text}`` (the first failing rank's error; "not run" when a failure
    or the deadline ended the launch first)."""
    folder = tempfile.mkdtemp(prefix="flashops-dist-")
    context = mp.start_processes(_worker, args=(world, backend, folder, module, list(scenarios)), nprocs=world,
                                 join=False, start_method="spawn")
    ended = time.monotonic() + deadline_s
    launch_error = None
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > ended:
                launch_error = f"the launch passed its {deadline_s:.0f} s deadline"
                break
    except ProcessException as error:
        launch_error = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    finished = {name: {} for name in scenarios}  # scenario -> {rank: error text or None}
    for rank in range(world):
        path = os.path.join(folder, f"rank{rank}.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    entry = json.loads(line)
                    finished[entry["scenario"]][rank] = entry["error"]
    outcome = {}
    for name, by_rank in finished.items():
        errors = [f"rank {rank}: {error}" for rank, error in sorted(by_rank.items()) if error is not None]
        if errors:
            outcome[name] = errors[0]
        else:
            outcome[name] = None if len(by_rank) == world else f"not run ({launch_error})"
    return outcome
