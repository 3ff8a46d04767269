"""Global-memory traffic of the Triton kernels, counted under the interpreter (bench/traffic.py): the counter
itself, the traffic of every kernel pinned at fixed shapes (an I/O regression fails here, on a CPU), exact
attention's traffic against its closed form, the lower bound, and ``python -m bench --io``."""

import csv
import math

import pytest
import torch
import triton
import triton.language as tl

import flashops
from bench import measure, run
from bench.cases import attention as attention_cases
from bench.registry import case, load_ops
from bench.traffic import count_traffic
from flashops._triton_utils import interpreter_enabled

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="traffic is counted under the Triton interpreter")
CPU = torch.device("cpu")


@triton.jit
def _scaled_copy_kernel(X, Y, COUNT, n, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=ok, other=0.0) * 2, mask=ok)
    tl.atomic_add(COUNT, 1)


def test_counter_counts_unmasked_lanes_per_tensor_and_unpatches():
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_masked_load
    x, y, count = torch.randn(1000), torch.empty(1000), torch.zeros(1, dtype=torch.int32)
    with count_traffic() as traffic:
        _scaled_copy_kernel[(triton.cdiv(1000, 64),)](x, y, count, 1000, BLOCK_N=64)
    assert torch.equal(y, 2 * x) and int(count) == 16
    (launch,) = traffic.launches
    assert launch.kernel == "_scaled_copy_kernel" and launch.grid == (16,) and launch.tiles == {"BLOCK_N": 64}
    # 1000 of the 1024 lanes are unmasked; the atomic reads and writes one int32 per program.
    assert dict(launch.read_by) == {"X": 4000, "COUNT": 16 * 4} and dict(launch.written_by) == {"Y": 4000, "COUNT": 64}
    assert traffic.by_kernel() == {"_scaled_copy_kernel": (1, 4064, 4064)}
    assert traffic.summary() == "_scaled_copy_kernel x1 [BLOCK_N=64]: X 1x COUNT 16x -> Y 1x COUNT 16x"
    assert interpreter.InterpreterBuilder.create_masked_load is original
    with count_traffic() as nothing:
        pass
    assert nothing.launches == [] and nothing.read == 0


def test_counter_needs_the_interpreter(monkeypatch):
    import flashops._triton_utils as triton_utils

    monkeypatch.setattr(triton_utils, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with count_traffic():
            pass


# ------------------------------------------------------------------------------------------ pinned traffic
def _bench_traffic(op_name, **params):
    """by_kernel() of one call of the op's flashops-triton provider on a tiny case: fwd+bwd when the op has
    gradients, else fwd."""
    op = load_ops().op(op_name)
    mode = "fwd+bwd" if op.differentiable else "fwd"
    c = case(op_name, torch.float32, (mode,), **params)
    generator = torch.Generator().manual_seed(0)
    inputs = measure.prepare_inputs(op, op.make_inputs(c, CPU, generator))
    provider = op.provider("flashops-triton")
    douts = measure.make_douts(measure.named_outputs(op, provider.run(inputs, c)), generator) if op.differentiable \
        else None
    call = measure.mode_fn(op, provider, c, inputs, douts, mode)
    with count_traffic() as traffic:
        call()
    return traffic


def _step_traffic():
    """Two recurrent decoding steps (Lightning, GLA) with their backward."""
    b, h, d = 2, 2, 16
    q, k, v, g = (torch.randn(b, h, d, requires_grad=True) for _ in range(4))
    state = torch.randn(b, h, d, d, requires_grad=True)
    with count_traffic() as traffic:
        o1, s1 = flashops.lightning_attention_step(q, k, v, state=state, backend="triton")
        o2, s2 = flashops.gated_linear_attention_step(q, k, v, torch.nn.functional.logsigmoid(g), state,
                                                      backend="triton")
        torch.autograd.grad((o1.sum() + o2.sum() + s1.sum() + s2.sum()), (q, k, v, g, state))
    return traffic


def _cauchy_traffic():
    v = torch.randn(3, 8, dtype=torch.complex64, requires_grad=True)
    w = torch.randn(8, dtype=torch.complex64, requires_grad=True)
    z = torch.randn(50, dtype=torch.complex64, requires_grad=True)
    with count_traffic() as traffic:
        out = flashops.cauchy_kernel(v, z, w, backend="triton")
        torch.autograd.grad(out.abs().sum(), (v, z, w))
    return traffic


# kernel -> (launches, bytes read, bytes written) of one forward + backward at the shape named; counted under
# the interpreter's tile sizes. A change here changes what the kernels ask of global memory: explain it in the
# commit (tests/test_traffic.py prints the new table when they differ).
PINNED = {
    "attention": (lambda: _bench_traffic("flash_attention", B=1, T=100, H=2, D=16, causal=False), {
        "attention_output_fwd_kernel": (1, 64000, 13600), "attention_delta_bwd_kernel": (1, 26400, 800),
        "attention_dkdv_bwd_kernel": (1, 80000, 25600), "attention_dq_bwd_kernel": (1, 78400, 12800)}),
    "attention-causal": (lambda: _bench_traffic("flash_attention", B=1, T=100, H=2, D=16, causal=True), {
        "attention_output_fwd_kernel": (1, 54784, 13600), "attention_delta_bwd_kernel": (1, 26400, 800),
        "attention_dkdv_bwd_kernel": (1, 62592, 25600), "attention_dq_bwd_kernel": (1, 69184, 12800)}),
    "lightning": (lambda: _bench_traffic("lightning_attention", B=1, T=100, H=2, D=16), {
        "linear_state_fwd_kernel": (2, 51216, 8192), "lightning_output_fwd_kernel": (1, 42512, 12800),
        "linear_state_bwd_kernel": (1, 25608, 4096), "lightning_dv_bwd_kernel": (1, 42512, 12800),
        "lightning_dqdk_bwd_kernel": (1, 59408, 25600)}),
    "gla": (lambda: _bench_traffic("gated_linear_attention", B=1, T=70, H=1, D=16), {
        "chunk_cumsum_fwd_kernel": (2, 8960, 8960), "linear_state_fwd_kernel": (2, 27136, 4096),
        "gla_intra_fwd_kernel": (2, 76800, 35840), "gla_output_fwd_kernel": (1, 33408, 4480),
        "linear_state_bwd_kernel": (1, 13568, 2048), "gla_dv_bwd_kernel": (1, 33536, 4480),
        "gla_dscores_bwd_kernel": (1, 8960, 17920), "gla_intra_bwd_kernel": (1, 55424, 8960),
        "gla_inter_bwd_kernel": (1, 40064, 13440)}),
    "noncausal": (lambda: _bench_traffic("linear_attention", B=1, T=100, H=2, D=16), {
        "noncausal_partial_fwd_kernel": (3, 76800, 6144), "noncausal_reduce_fwd_kernel": (3, 6144, 6144),
        "noncausal_apply_fwd_kernel": (4, 67584, 51200)}),
    "steps": (_step_traffic, {
        "recurrent_step_fwd_kernel": (2, 10000, 8704), "recurrent_step_bwd_kernel": (2, 18960, 9984)}),
    "lla": (lambda: _bench_traffic("local_linear_attention", B=1, T=40, H=1, D=8), {
        "lla_output_fwd_kernel": (1, 29152, 4000), "lla_dq_bwd_kernel": (1, 36736, 4960),
        "lla_dkdv_bwd_kernel": (1, 10112, 2560)}),
    "lla-decode": (lambda: _bench_traffic("local_linear_attention_decode", B=1, T=40, H=1, D=8), {
        "lla_decode_fwd_kernel": (1, 2624, 2184)}),
    # Decoding: K and V read once even across 2 splits; the paged cache also reads a page id per key tile.
    "kvcache": (lambda: _bench_traffic("flash_attention_with_kvcache", B=2, T=256, H=4, Hkv=2, D=16, page=0), {
        "kvcache_output_fwd_kernel": (1, 132128, 1088), "kvcache_combine_fwd_kernel": (1, 1152, 544)}),
    "kvcache-paged": (lambda: _bench_traffic("flash_attention_with_kvcache", B=2, T=256, H=4, Hkv=2, D=16, page=16), {
        "kvcache_output_fwd_kernel": (1, 136224, 1088), "kvcache_combine_fwd_kernel": (1, 1152, 544)}),
    "scans": (lambda: (_bench_traffic("linear_scan", B=1, D=4, L=100),
                       _bench_traffic("selective_scan", B=1, D=4, N=4, L=50)), {
        # fwd: a, b read, h written (1600 B each); bwd: dh, a (shifted one step), h read, da, db written
        "scan_linear_fwd_kernel": (2, 7968, 4800),
        "scan_selective_fwd_kernel": (1, 4096, 992), "scan_selective_bwd_kernel": (1, 5088, 4096)}),
    "convolution": (lambda: (_bench_traffic("vandermonde_kernel", H=2, N=4, L=100), _cauchy_traffic()), {
        "conv_vandermonde_fwd_kernel": (1, 128, 800), "conv_vandermonde_bwd_kernel": (1, 864, 128),
        "conv_cauchy_fwd_kernel": (2, 3168, 2400), "conv_cauchy_bwd_kernel": (1, 2784, 384)}),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_kernel_traffic_is_pinned(name):
    make, expected = PINNED[name]
    counted = make()
    got = {}
    for traffic in counted if isinstance(counted, tuple) else (counted,):
        got.update(traffic.by_kernel())
    assert got == expected, f"traffic of {name} changed; now {got}"


# ---------------------------------------------------------------------------------- attention's closed form
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [1, 100, 129])
def test_attention_forward_traffic_matches_its_tiling(t, causal):
    """The forward reads Q once and, for each block of BLOCK_M queries, the K and V rows its key tiles cover
    (all T keys; causal: up to the block's last query, in whole BLOCK_N tiles), and writes O and the LSE once."""
    b, h, d, e = 2, 3, 16, 4
    q, k, v = (torch.randn(b, t, h, d) for _ in range(3))
    with count_traffic() as traffic:
        flashops.flash_attention(q, k, v, causal=causal, backend="triton")
    (launch,) = traffic.launches
    block_m, block_n = launch.tiles["BLOCK_M"], launch.tiles["BLOCK_N"]
    key_rows = 0
    for start in range(0, t, block_m):
        last = min(t, start + block_m)
        key_rows += min(t, math.ceil(last / block_n) * block_n) if causal else t
    row = h * d * e
    assert dict(launch.read_by) == {"Q": b * t * row, "K": b * key_rows * row, "V": b * key_rows * row}
    assert dict(launch.written_by) == {"O": b * t * row, "LSE": b * h * t * 4}


def test_attention_bound_is_below_a_flash_attention_tiling_and_close_to_it():
    """The lower bound never exceeds what a FlashAttention-style tiling moves with the same SRAM (a block of
    a = M / (4 D) query rows resident, K and V streamed once per block: 2 T^2 D / a + 2 T D elements per head),
    and at long T it is within a constant factor of it (the bound charges neither V nor the accumulators)."""
    for d in (64, 128):
        for t in (4096, 16384, 65536):
            for dtype in (torch.bfloat16, torch.float32):
                c = case("flash_attention", dtype, B=1, T=t, H=8, D=d, causal=False)
                e = torch.empty((), dtype=dtype).element_size()
                rows = attention_cases.SM_SRAM_BYTES / e / (4 * d)
                tiling = c["B"] * c["H"] * (2 * t * t * d / rows + 2 * t * d) * e
                bound = attention_cases.traffic_bound(c, "fwd")
                assert bound <= tiling
                if t == 65536:
                    assert bound > tiling / 16
                    assert attention_cases.traffic_bound(c, "bwd") > 1.9 * bound
    tiny = case("flash_attention", torch.float32, B=1, T=128, H=4, D=64, causal=True)
    assert attention_cases.traffic_bound(tiny, "fwd") == 0.0  # below the SRAMs' contents: the minimum rules


def test_io_cli_reports_traffic_minimum_and_bound(tmp_path):
    code = run.main(["--io", "--op", "flash_attention", "--set", "T=128", "--set", "causal=1", "--mode", "fwd",
                     "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "quick-io.csv", newline="") as f:
        rows = {r["metric"]: r for r in csv.DictReader(f) if r["provider"] == "flashops-triton"}
    b, t, h, d = (int(rows["status"][k]) for k in ("B", "T", "H", "D"))
    assert rows["status"]["value"] == "OK" and rows["status"]["suite"] == "traffic"
    assert "attention_output_fwd_kernel x1" in rows["status"]["note"]
    qkvo = 4 * b * t * h * d * 4
    assert float(rows["bytes_min"]["value"]) == qkvo
    assert float(rows["bytes_written"]["value"]) == qkvo / 4 + b * h * t * 4  # O and the LSE
    assert float(rows["bytes_read"]["value"]) > 3 * qkvo / 4  # K and V are read once per query block
    assert float(rows["bytes_bound"]["value"]) == qkvo  # tiny: the bound is the minimum
    assert float(rows["bytes_read:attention_output_fwd_kernel"]["value"]) == float(rows["bytes_read"]["value"])
