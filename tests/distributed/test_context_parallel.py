"""flashops.distributed on real process groups: gloo with 1, 2 and 4 CPU processes (NCCL when several GPUs
exist). On every rank, outputs and every gradient (sharded inputs exactly, replicated ones summed over the
ranks) equal the single-process op on the full sequence: causal and not, windows, GQA, both layouts, initial
and final states, the modules, torch.compile; uneven lengths get clear errors; a failing rank does not hang
its peers.

The scenarios (``check_*``) run inside the spawned ranks (see ``launcher.py``); each pytest test is one
launch, so that every process pays for importing torch once.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import flashops
from flashops import distributed as cp
from flashops.modules.attention import alibi_slopes
from flashops.nn import FlashSelfAttention, GatedLinearAttention, LightningAttention
from flashops.testing import GRAD_FACTOR, assert_close

from . import launcher

CHUNK = 5  # rows per layout chunk: odd, so that no kernel block divides a shard
B, H, D = 2, 4, 16
D_K, D_V = 8, 12  # linear attention: K != V
LAYOUTS = ("zigzag", "contiguous")


# ---------------------------------------------------------------------------------------------- helpers
def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _full(seed: int, *shape) -> torch.Tensor:
    """The same tensor on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(_device())


def _length(layout: str, world: int) -> int:
    return CHUNK * (2 * world if layout == "zigzag" else world)


def _single_process(full_fn, inputs, dtype):
    """Outputs, output gradients and input gradients of ``full_fn`` on the whole inputs (the sequences cast to
    dtype; states stay fp32)."""
    leaves = [x.detach().to(dtype if sharded else x.dtype, copy=True).requires_grad_() for x, sharded in inputs]
    outputs = full_fn(*leaves)
    out_grads = [_full(90 + i, *o.shape).to(o.dtype) for i, o in enumerate(outputs)]
    torch.autograd.backward(outputs, out_grads)
    return outputs, out_grads, [leaf.grad for leaf in leaves]


def _compare(name, local_fn, full_fn, inputs, layout, sharded_outputs=(True,), dtype=torch.float32):
    """``local_fn`` on this rank's part of ``inputs`` against ``full_fn`` on the whole, outputs and gradients.

    ``inputs``: ``[(full fp32 tensor, sharded)]``: sharded ones are sequences ``[B, T, ...]`` (this rank gets its
    part), the others every rank holds whole (their gradient is this rank's part: summed over the ranks it must
    give the single-process one). Both functions return tuples; ``sharded_outputs`` says which outputs are
    sequences. A replicated output's gradient is split evenly over the ranks, so that the ranks' losses add up
    to the single-process loss. With ``dtype`` below fp32 the sequences are cast to it and the tolerance rule's
    baseline is the single-process op in ``dtype`` (the oracle: the same in fp32)."""
    world = dist.get_world_size()
    expected, out_grads, expected_grads = _single_process(full_fn, inputs, torch.float32)
    baseline, _, baseline_grads = (_single_process(full_fn, inputs, dtype) if dtype != torch.float32
                                   else ([None] * len(expected), None, [None] * len(inputs)))

    def part(x, sharded):
        return None if x is None else cp.shard(x, layout=layout) if sharded else x

    leaves = [part(x, sharded).to(dtype if sharded else x.dtype).detach().requires_grad_() for x, sharded in inputs]
    got = local_fn(*leaves)
    torch.autograd.backward(got, [(cp.shard(g, layout=layout) if sharded else g / world).to(o.dtype)
                                  for g, sharded, o in zip(out_grads, sharded_outputs, got)])
    for i, (actual, sharded) in enumerate(zip(got, sharded_outputs)):
        assert_close(f"{name}: output {i}", actual, part(expected[i], sharded), part(baseline[i], sharded),
                     dtype=dtype)
    for i, ((_, sharded), leaf) in enumerate(zip(inputs, leaves)):
        grad = leaf.grad
        if not sharded:
            dist.all_reduce(grad)
        assert_close(f"{name}: gradient of input {i}", grad, part(expected_grads[i], sharded),
                     part(baseline_grads[i], sharded), factor=GRAD_FACTOR, dtype=dtype)


def _qkv(world, layout, h_kv=H, seed=1, heads=H):
    t = _length(layout, world)
    return _full(seed, B, t, heads, D), _full(seed + 1, B, t, h_kv, D), _full(seed + 2, B, t, h_kv, D)


# -------------------------------------------------------------------------------------- exact attention
EXACT_CASES = [  # layout, causal, window, key/value heads
    ("zigzag", True, (-1, -1), 2),
    ("zigzag", False, (-1, -1), H),
    ("contiguous", True, (-1, -1), 2),
    ("zigzag", True, (7, 0), 1),
    ("contiguous", False, (4, 3), 2),
    ("zigzag", False, (3, 6), H),
]


def _check_exact(op, world, cases, backend=None, heads=H, dtype=torch.float32, **extra):
    for layout, causal, window, h_kv in cases:
        q, k, v = _qkv(world, layout, h_kv, heads=heads)
        options = dict(causal=causal, window_size=window, backend=backend, **extra)
        _compare(f"{op.__name__} {layout} causal={causal} window={window} Hkv={h_kv} {dtype} {sorted(extra)}",
                 lambda q, k, v: (op(q, k, v, layout=layout, **options),),
                 lambda q, k, v: (flashops.flash_attention(q, k, v, **options),),
                 [(q, True), (k, True), (v, True)], layout, dtype=dtype)


def _check_exact_lse(op, world, cases, **extra):
    """return_lse=True: the log-sum-exp of this rank's rows (compared as [B, T, H], so that it shards like the
    output), with a loss on it as well as on the output."""
    for layout, causal, window, h_kv in cases:
        q, k, v = _qkv(world, layout, h_kv)
        options = dict(causal=causal, window_size=window, return_lse=True, **extra)

        def rows_first(result):
            return result[0], result[1].transpose(1, 2)

        _compare(f"{op.__name__} {layout} causal={causal} window={window} Hkv={h_kv} return_lse {sorted(extra)}",
                 lambda q, k, v: rows_first(op(q, k, v, layout=layout, **options)),
                 lambda q, k, v: rows_first(flashops.flash_attention(q, k, v, **options)),
                 [(q, True), (k, True), (v, True)], layout, sharded_outputs=(True, True))


def check_ring_attention(rank, world):
    _check_exact(cp.ring_attention, world, EXACT_CASES)
    # bf16: partials merge and dK/dV accumulate in fp32, so the error is that of the single-device op.
    _check_exact(cp.ring_attention, world, EXACT_CASES[:1], dtype=torch.bfloat16)
    # Softcap is elementwise on the logits: every block applies it, the partials merge as usual.
    _check_exact(cp.ring_attention, world, EXACT_CASES[:4], softcap=2.0)
    _check_exact_lse(cp.ring_attention, world, EXACT_CASES)


def check_ulysses_attention(rank, world):
    # Hkv = 1 and 2 with P = 4: the key/value heads are repeated until P divides them.
    _check_exact(cp.ulysses_attention, world, EXACT_CASES)
    slopes = alibi_slopes(H).to(_device())
    per_batch = slopes[None].repeat(B, 1) * torch.tensor([[1.0], [0.5]], device=_device())
    _check_exact(cp.ulysses_attention, world, EXACT_CASES[:4], softcap=2.0, alibi_slopes=slopes)
    _check_exact(cp.ulysses_attention, world, EXACT_CASES[4:], alibi_slopes=per_batch)
    _check_exact_lse(cp.ulysses_attention, world, EXACT_CASES)
    _check_exact_lse(cp.ulysses_attention, world, EXACT_CASES[:2], softcap=2.0, alibi_slopes=slopes)


def check_ring_attention_triton(rank, world):
    """The Triton kernels (interpreter on CPUs) with the block windows ring attention gives them: causal
    diagonal blocks, unmasked blocks and windows that exclude a block's diagonal (negative window_left)."""
    _check_exact(cp.ring_attention, world, [("zigzag", True, (7, 0), 1)], backend="triton", heads=2)


# ------------------------------------------------------------------------------------ linear attention
def _linear_inputs(world, layout, seed=11):
    t = _length(layout, world)
    q, k = _full(seed, B, t, H, D_K), _full(seed + 1, B, t, H, D_K)
    v = _full(seed + 2, B, t, H, D_V)
    g = F.logsigmoid(_full(seed + 3, B, t, H, D_K) + 2.0) / 4
    g[:, 1::7, 0] = -40.0  # past the kernels' log-gate floor of -30: the folded states must floor the same way
    return q, k, v, g, _full(seed + 4, B, H, D_K, D_V)


def check_lasp2_attention(rank, world):
    slopes = flashops.lightning_slopes(H, device=_device())
    for layout, dtype in [("zigzag", torch.float32), ("contiguous", torch.float32), ("zigzag", torch.bfloat16)]:
        q, k, v, g, h0 = _linear_inputs(world, layout)
        sequences = [(q, True), (k, True), (v, True)]
        _compare(f"lasp2 lightning {layout} with states {dtype}",
                 lambda q, k, v, h0: cp.lasp2_attention(q, k, v, slopes=slopes, initial_state=h0,
                                                        output_final_state=True, layout=layout),
                 lambda q, k, v, h0: flashops.lightning_attention(q, k, v, slopes, initial_state=h0,
                                                                  output_final_state=True),
                 [*sequences, (h0, False)], layout, sharded_outputs=(True, False), dtype=dtype)
        if dtype != torch.float32:
            continue
        _compare(f"lasp2 gla {layout} with states",
                 lambda q, k, v, g, h0: cp.lasp2_attention(q, k, v, g=g, initial_state=h0, output_final_state=True,
                                                           layout=layout),
                 lambda q, k, v, g, h0: flashops.gated_linear_attention(q, k, v, g, initial_state=h0,
                                                                        output_final_state=True),
                 [*sequences, (g, True), (h0, False)], layout, sharded_outputs=(True, False))
        _compare(f"lasp2 lightning {layout} default slopes, scale 1",
                 lambda q, k, v: (cp.lasp2_attention(q, k, v, scale=1.0, layout=layout)[0],),
                 lambda q, k, v: (flashops.lightning_attention(q, k, v, scale=1.0)[0],), sequences, layout)
        _check_lasp2_gqa_reverse(world, layout)


def _check_lasp2_gqa_reverse(world, layout):
    """GQA (2 kv heads for 4 query heads; Lightning's states per query head by default, per kv head with
    [H_kv] slopes; GLA's per kv head) and reverse=True, with states, against the single-device ops."""
    q, k, v, g, _ = _linear_inputs(world, layout, seed=31)
    k, v, g = k[:, :, ::2].contiguous(), v[:, :, ::2].contiguous(), g[:, :, ::2].contiguous()
    h0_query, h0_kv = _full(37, B, H, D_K, D_V), _full(38, B, H // 2, D_K, D_V)
    kv_slopes = flashops.lightning_slopes(H // 2, device=_device())
    sequences = [(q, True), (k, True), (v, True)]
    for reverse in (False, True):
        options = dict(output_final_state=True, reverse=reverse)
        _compare(f"lasp2 lightning {layout} GQA reverse={reverse}",
                 lambda q, k, v, h0: cp.lasp2_attention(q, k, v, initial_state=h0, layout=layout, **options),
                 lambda q, k, v, h0: flashops.lightning_attention(q, k, v, initial_state=h0, **options),
                 [*sequences, (h0_query, False)], layout, sharded_outputs=(True, False))
        _compare(f"lasp2 lightning {layout} GQA kv slopes reverse={reverse}",
                 lambda q, k, v, h0: cp.lasp2_attention(q, k, v, slopes=kv_slopes, initial_state=h0, layout=layout,
                                                        **options),
                 lambda q, k, v, h0: flashops.lightning_attention(q, k, v, kv_slopes, initial_state=h0, **options),
                 [*sequences, (h0_kv, False)], layout, sharded_outputs=(True, False))
        _compare(f"lasp2 gla {layout} GQA reverse={reverse}",
                 lambda q, k, v, g, h0: cp.lasp2_attention(q, k, v, g=g, initial_state=h0, layout=layout, **options),
                 lambda q, k, v, g, h0: flashops.gated_linear_attention(q, k, v, g, initial_state=h0, **options),
                 [*sequences, (g, True), (h0_kv, False)], layout, sharded_outputs=(True, False))


# ------------------------------------------------------------------------------------------ layouts
def check_layouts(rank, world):
    for layout in LAYOUTS:
        x = _full(21, 3, _length(layout, world), 2)
        local = cp.shard(x, layout=layout)
        if layout == "zigzag":
            mirror = 2 * world - 1 - rank
            assert torch.equal(local, torch.cat([x[:, rank * CHUNK:(rank + 1) * CHUNK],
                                                 x[:, mirror * CHUNK:(mirror + 1) * CHUNK]], 1))
        else:
            assert torch.equal(local, x[:, rank * CHUNK:(rank + 1) * CHUNK])
        assert torch.equal(cp.unshard(local, layout=layout), x)
        x_first = x.transpose(0, 1).contiguous()  # [T, B, C]
        assert torch.equal(cp.unshard(cp.shard(x_first, layout=layout, dim=0), layout=layout, dim=0), x_first)
        positions = cp.global_positions(local.shape[1], layout=layout, device=x.device)
        assert torch.equal(positions, cp.shard(torch.arange(x.shape[1], device=x.device)[None], layout=layout)[0])
        # Every rank's loss uses the whole sequence: this rank's part gets the sum of their gradients.
        leaf = local.detach().requires_grad_()
        weight = _full(30 + rank, *x.shape)
        (cp.unshard(leaf, layout=layout) * weight).sum().backward()
        total = weight.clone()
        dist.all_reduce(total)
        assert_close("unshard gradient", leaf.grad, cp.shard(total, layout=layout))


def check_errors(rank, world):
    odd = _full(40, 1, 2 * world * CHUNK + 1, 2, 8)
    with pytest.raises(ValueError, match=f"length {odd.shape[1]} .* divisible by {2 * world}"):
        cp.shard(odd)
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.shard(odd, layout="striped")
    with pytest.raises(ValueError, match="local sequence length 3,.*must be even"):
        cp.ring_attention(odd[:, :3], odd[:, :3], odd[:, :3])
    with pytest.raises(ValueError, match="local sequence length 3,.*must be even"):
        cp.lasp2_attention(odd[:, :3], odd[:, :3], odd[:, :3])
    with pytest.raises(ValueError, match="local lengths 4 and 2"):
        cp.ring_attention(odd[:, :4], odd[:, :2], odd[:, :2])
    with pytest.raises(ValueError, match="not both"):
        cp.lasp2_attention(odd[:, :4], odd[:, :4], odd[:, :4], slopes=torch.zeros(2), g=odd[:, :4])
    four_heads = _full(42, 1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\) or \(1, 4\), got \(8,\)"):
        cp.ulysses_attention(four_heads, four_heads, four_heads, alibi_slopes=torch.zeros(8, device=_device()))
    heads_error = r"query heads \(4\) must be a multiple of the number of key/value heads \(3\)"
    with pytest.raises(ValueError, match=heads_error):
        cp.lasp2_attention(four_heads, four_heads[:, :, :3], four_heads[:, :, :3])
    with pytest.raises(ValueError, match=r"slopes must have shape \[H\] = \(4,\) or \[H_kv\] = \(2,\), got \(3,\)"):
        cp.lasp2_attention(four_heads, four_heads[:, :, :2], four_heads[:, :, :2], slopes=torch.zeros(3))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, H, K, V\] = \(1, 2, 8, 8\)"):
        kv = four_heads[:, :, :2]
        cp.lasp2_attention(four_heads, kv, kv, g=torch.zeros_like(kv), initial_state=torch.zeros(1, 4, 8, 8))
    with pytest.raises(TypeError, match="ProcessGroup"):
        cp.ring_attention(odd[:, :4], odd[:, :4], odd[:, :4], group="world")
    if world > 1:
        three_heads = _full(41, 1, 4, 3, 8)
        with pytest.raises(ValueError, match=r"query heads \(3\) must be divisible by the group size"):
            cp.ulysses_attention(three_heads, three_heads, three_heads)


def check_empty_inputs(rank, world):
    """An empty batch or sequence gives empty outputs and gradients on every op and option (the log-sum-exp, GQA,
    reverse), the log-sum-exp included in the loss."""
    def with_lse(out_lse):
        out, lse = out_lse
        return out + lse.sum()

    half = H // 2
    ops = {"ring": lambda x: cp.ring_attention(x, x, x, causal=True),
           "ulysses": lambda x: cp.ulysses_attention(x, x, x, causal=True),
           "ring lse": lambda x: with_lse(cp.ring_attention(x, x, x, causal=True, return_lse=True)),
           "ulysses lse": lambda x: with_lse(cp.ulysses_attention(x, x, x, return_lse=True)),
           "lasp2": lambda x: cp.lasp2_attention(x, x, x)[0],
           "gla": lambda x: cp.lasp2_attention(x, x, x, g=torch.zeros_like(x))[0],
           "lasp2 gqa reverse": lambda x: cp.lasp2_attention(x, x[:, :, :half], x[:, :, :half], reverse=True)[0],
           "gla gqa reverse": lambda x: cp.lasp2_attention(x, x[:, :, :half], x[:, :, :half],
                                                           g=torch.zeros_like(x[:, :, :half]), reverse=True)[0]}
    for shape in [(0, 4, H, D_K), (B, 0, H, D_K)]:
        for name, op in ops.items():
            x = torch.zeros(shape, device=_device(), requires_grad=True)
            out = op(x)
            out.sum().backward()
            assert out.shape == shape and x.grad.shape == shape, (name, shape)


# ------------------------------------------------------------------------------------------ modules
def _module_pair(make):
    torch.manual_seed(0)
    single = make(None).to(_device())
    sharded = make(dist.group.WORLD).to(_device())
    sharded.load_state_dict(single.state_dict())
    return single, sharded


def check_modules(rank, world):
    layers = {
        "FlashSelfAttention": lambda group: FlashSelfAttention(32, 4, 2, causal=True, cp_group=group),
        "FlashSelfAttention softcap": lambda group: FlashSelfAttention(32, 4, 2, causal=True, softcap=5.0,
                                                                       cp_group=group),
        "LightningAttention": lambda group: LightningAttention(32, 4, cp_group=group),
        "GatedLinearAttention": lambda group: GatedLinearAttention(32, 4, cp_group=group),
        "LightningAttention GQA": lambda group: LightningAttention(32, 4, num_kv_heads=2, cp_group=group),
        "GatedLinearAttention MQA": lambda group: GatedLinearAttention(32, 4, num_kv_heads=1, cp_group=group),
    }
    for name, make in layers.items():
        single, sharded = _module_pair(make)
        x = _full(50, B, _length("zigzag", world), 32)

        def first(y):
            return (y[0] if isinstance(y, tuple) else y,)

        params = dict(single.named_parameters())
        _compare(name, lambda x: first(sharded(x)), lambda x: first(single(x)), [(x, True)], "zigzag")
        for pname, p in sharded.named_parameters():
            dist.all_reduce(p.grad)
            assert_close(f"{name}: gradient of {pname}", p.grad, params[pname].grad)


def check_custom_ops(rank, world):
    """opcheck (schemas, fake kernels, autograd registration) of the communicating custom ops, and
    torch.compile(fullgraph=True) through the public functions."""
    group = dist.group.WORLD.group_name
    q, k, v = (cp.shard(x).requires_grad_() for x in _qkv(world, "zigzag", h_kv=2))
    qa, ka, va, g, h0 = _linear_inputs(world, "zigzag")
    qa, ka, va, g = (cp.shard(x) for x in (qa, ka, va, g))
    states = _full(70, 2, B, H, D_K, D_V + 1).requires_grad_()
    ops = torch.ops.flashops
    torch.library.opcheck(ops.ring_attention_fwd.default, (q, k, v, group, 0.25, 0.0, 3, 0, "zigzag", "torch"))
    torch.library.opcheck(ops.ring_attention_fwd.default, (q, k, v, group, 0.25, 2.0, None, 0, "zigzag", "torch"))
    torch.library.opcheck(ops.cp_all_gather.default, (q, group))
    torch.library.opcheck(ops.cp_all_to_all.default, (_full(71, world, 3, 2), group))
    torch.library.opcheck(ops.lasp2_fold_fwd.default, (states, h0, None, group, "zigzag", True, False))
    torch.library.opcheck(ops.lasp2_fold_fwd.default, (states, h0, None, group, "zigzag", True, True))
    functions = {
        "ring": lambda: cp.ring_attention(q, k, v, causal=True),
        "ulysses": lambda: cp.ulysses_attention(q, k, v, causal=True),
        "lasp2": lambda: cp.lasp2_attention(qa, ka, va, g=g)[0],
    }
    for name, fn in functions.items():
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        assert_close(f"compiled {name}", compiled(), fn())


# ------------------------------------------------------------------------------------------ failure
def check_failed_rank_does_not_hang_peers(rank, world):
    """The last rank rejects its input (before any communication); the others, inside the ring, get an error
    from the group's timeout instead of waiting forever."""
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3))
    q = cp.shard(_full(60, 1, _length("zigzag", world), 2, 8), group)
    start = time.monotonic()
    if rank == world - 1:
        with pytest.raises(ValueError, match="must be even"):
            cp.ring_attention(q[:, 1:], q[:, 1:], q[:, 1:], group=group)
    else:
        with pytest.raises(RuntimeError):
            cp.ring_attention(q, q, q, group=group)
        assert time.monotonic() - start < 30
    dist.barrier()  # the failed rank stays up until its peers gave up: they time out rather than see it exit


# --------------------------------------------------------------------------------------------- tests
COMMON = ["check_layouts", "check_errors", "check_empty_inputs", "check_ring_attention", "check_ulysses_attention",
          "check_lasp2_attention", "check_modules"]
SCENARIOS = {
    1: COMMON,
    2: COMMON + ["check_ring_attention_triton", "check_custom_ops", "check_failed_rank_does_not_hang_peers"],
    4: COMMON,
}


def _assert_passed(outcome: dict):
    failed = {name: error for name, error in outcome.items() if error is not None}
    assert not failed, "\n\n".join(f"{name}: {error}" for name, error in failed.items())


@pytest.mark.parametrize("world", sorted(SCENARIOS))
def test_gloo(world):
    _assert_passed(launcher.run(__name__, SCENARIOS[world], world, backend="gloo"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"NCCL needs 2 or more GPUs, found "
                                                          f"{torch.cuda.device_count()}")
def test_nccl():
    world = torch.cuda.device_count()
    _assert_passed(launcher.run(__name__, COMMON + ["check_ring_attention_triton", "check_custom_ops"], world,
                                backend="nccl"))


def test_import_flashops_leaves_distributed_alone():
    """``import flashops`` neither imports flashops.distributed nor creates any process group; the attribute
    loads it on first use."""
    code = ("import sys, torch.distributed as dist, flashops\n"
            "assert 'flashops.distributed' not in sys.modules and not dist.is_initialized()\n"
            "assert flashops.distributed.ring_attention is sys.modules['flashops.distributed'].ring_attention\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_uninitialized_group_is_a_clear_error():
    x = torch.zeros(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.shard(x)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.ring_attention(x, x, x)
