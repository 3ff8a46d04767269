"""Quick GPU timing of flashops' exact attention against torch SDPA's flash backend (bf16, B*T = 16k tokens).

    python scripts/attention_perf.py [--modes fwd,fwdbwd] [--seqlens 1024,4096,16384]

Prints TFLOP/s with the FlashAttention convention (fwd 4*B*H*T*T*D, halved when causal; fwd+bwd 3.5x fwd).
"""

import argparse

import torch
import torch.nn.functional as F
import triton

import flashops


def flops(b, h, t, d, causal, mode):
    f = 4 * b * h * t * t * d / (2 if causal else 1)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--seqlens", default="1024,4096,8192,16384")
    parser.add_argument("--hdims", default="64,128")
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), "torch", torch.__version__, "triton", triton.__version__)
    print(f"{'hdim':>4} {'causal':>6} {'T':>6} {'mode':>7} {'flashops':>9} {'sdpa-fa':>9} {'ratio':>6}  max|diff|")
    for d in map(int, args.hdims.split(",")):
        h = 2048 // d
        for causal in (False, True):
            for t in map(int, args.seqlens.split(",")):
                b = max(1, 16384 // t)
                q, k, v = (torch.randn(b, t, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                ours = flashops.flash_attention(q, k, v, causal=causal)
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    theirs = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                diff = (ours.float() - theirs.transpose(1, 2).float()).abs().max().item()
                do = torch.randn_like(ours)
                do_s = do.transpose(1, 2).contiguous()
                for mode in args.modes.split(","):
                    def run_ours():
                        o = flashops.flash_attention(q, k, v, causal=causal)
                        if mode == "fwdbwd":
                            torch.autograd.grad(o, (q, k, v), do)

                    def run_theirs():
                        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                        if mode == "fwdbwd":
                            torch.autograd.grad(o, (qs, ks, vs), do_s)

                    ms_ours = triton.testing.do_bench(run_ours, warmup=50, rep=200)
                    ms_theirs = triton.testing.do_bench(run_theirs, warmup=50, rep=200)
                    f = flops(b, h, t, d, causal, mode)
                    print(f"{d:>4} {str(causal):>6} {t:>6} {mode:>7} {f / ms_ours * 1e-9:9.1f} "
                          f"{f / ms_theirs * 1e-9:9.1f} {ms_theirs / ms_ours:6.2f}  {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
