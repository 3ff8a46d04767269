"""The memory-scaling sweep: peak memory of one forward + backward vs the swept size, for flashops's backends
and the materialized reference (plus any peers an op names).

On a GPU the peak is ``torch.cuda.max_memory_allocated`` above what was allocated before the call. On the CPU
the allocator keeps no statistics, so each point runs in a fresh single-threaded subprocess
(``python -m bench.memprobe``) that reads its peak resident memory (VmHWM, reset just before the call)
with glibc told to return every large block to the system on free: repeatable to a fraction of a MiB.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import measure
from .progress import Progress
from .registry import Case, Op, Provider, name_matches
from .results import BUDGET_SPENT, ERROR, OK, OOM, SKIP, Result

MODE = "fwd+bwd"
GPU_METHOD = "torch.cuda.max_memory_allocated above the inputs"
CPU_METHOD = "peak RSS (VmHWM) above the inputs, one subprocess per point, 1 thread"


def reference_provider(op: Op) -> Provider:
    """The op's reference in the input dtype: everything materialized, as a plain PyTorch user would."""
    return Provider("reference", lambda inputs, case: op.reference(inputs, case, False), peer=True)


def memory_providers(op: Op) -> list:
    named = op.memory_providers or ()
    return [p for p in op.providers if not p.peer or p.name in named] + [reference_provider(op)]


def find_provider(op: Op, name: str) -> Provider:
    return reference_provider(op) if name == "reference" else op.provider(name)


def fwd_bwd(op: Op, provider: Provider, case: Case, inputs: dict, douts=None):
    """One forward + backward; returns the outputs' gradients' holder so nothing is freed before the peak."""
    outs = measure.named_outputs(op, provider.run(inputs, case))
    if not op.differentiable:
        return outs
    if douts is None:
        douts = {n: torch.ones_like(t) for n, t in measure.differentiable_outputs(outs).items()}
    return measure.grads(op, inputs, outs, douts)


def run_memory(ops, sweep, device, providers_wanted, filters, keep, progress_enabled, deadline=None) -> list:
    plan = []
    for op in ops:
        if op.memory_cases is None:
            continue
        providers = [p for p in memory_providers(op) if name_matches(p.name, providers_wanted)]
        for case in op.memory_cases(sweep, device):
            if keep(case, filters):
                plan += [(op, case, p) for p in providers]
    progress = Progress(len(plan), "memory", enabled=progress_enabled)
    results = []
    for op, case, provider in plan:
        progress.step(f"{op.name} {case.shape} {provider.name}")
        if deadline is not None and time.monotonic() > deadline:
            results.append(Result(op.name, op.family, provider.name, provider.peer, case, MODE, SKIP,
                                  BUDGET_SPENT, suite="memory", x_name=op.x, panels=op.panels))
            continue
        results.append(_measure(op, case, provider, device))
    progress.close()
    return results


def _measure(op: Op, case: Case, provider: Provider, device) -> Result:
    def result(status, note="", mem=None):
        return Result(op.name, op.family, provider.name, provider.peer, case, MODE, status, note, suite="memory",
                      x_name=op.x, panels=op.panels, mem_mib=mem)

    reason = provider.unavailable() or provider.supports(case, MODE, device)
    if reason:
        return result(SKIP, reason)
    if device.type == "cuda":
        try:
            generator = torch.Generator(device=device).manual_seed(0)
            inputs = measure.prepare_inputs(op, op.make_inputs(case, device, generator))
            fwd_bwd(op, provider, case, inputs)  # warmup: compilation, autotuning, workspaces
            mem = measure.peak_memory_mib(lambda: fwd_bwd(op, provider, case, inputs), device)
            return result(OK, GPU_METHOD, mem)
        except torch.cuda.OutOfMemoryError as error:
            return result(OOM, str(error).splitlines()[0][:200])
        except Exception as error:
            return result(SKIP if provider.errors_are_skips else ERROR, f"{type(error).__name__}: {error}"[:300])
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    return _measure_cpu_subprocess(op, case, provider, result)


def _measure_cpu_subprocess(op: Op, case: Case, provider: Provider, result) -> Result:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    spec = json.dumps({"op": op.name, "provider": provider.name, "params": dict(case.params),
                       "dtype": case.dtype_name, "modes": list(case.modes)})
    proc = subprocess.run([sys.executable, "-m", "bench.memprobe", spec], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return result(ERROR, f"memory probe failed: {last[:300]}")
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    if answer.get("status") != OK:
        return result(answer.get("status", ERROR), answer.get("note", ""))
    return result(OK, CPU_METHOD, answer["peak_kib"] / 1024)
