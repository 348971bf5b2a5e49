#!/usr/bin/env python3
"""Peers for `moe bench moe-layer`, on the same shapes and with the same columns, bf16, CUDA-event
median of repeats:
  * torch._grouped_mm, torchtitan-style dropless MoE: softmax top-k (renormalised), stable sort of
    (token, slot) by expert, rows padded per expert to a multiple of 16 on the device (no host
    sync), grouped GEMMs for gate_up and down, SwiGLU, weighted index_add combine; autograd backward.
  * DeepSpeed-MoE (deepspeed.moe.layer.MoE, top-1/top-2 gating with capacity) when importable;
    its gate supports k <= 2, so other shapes print "n/a".
Usage on the GPU machine: python3 scripts/peers/moe_layer_peers.py [--shapes d:F:E:k:T,...]
"""
import argparse
import os

import torch
import torch.nn.functional as F

DEFAULT = ["4096:14336:8:2:8192", "2048:768:128:8:8192", "2048:1024:64:8:8192", "2048:8192:128:1:8192", "2048:768:128:8:16"]
PEAK_TFLOPS, PEAK_TBS = 816.0, 4.2
SET_TO_NONE = False


def median_ms(fn, warmup=2, reps=10):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


class GroupedMoE(torch.nn.Module):
    ALIGN = 16

    def __init__(self, d, f, e, k):
        super().__init__()
        self.e, self.k, self.f = e, k, f
        self.router = torch.nn.Parameter(torch.randn(e, d) * 0.02)
        self.w_gate_up = torch.nn.Parameter(torch.randn(e, d, 2 * f) * 0.02)  # [E, K, N] for grouped_mm
        self.w_down = torch.nn.Parameter(torch.randn(e, f, d) * 0.02)

    def forward(self, x):
        T, d = x.shape
        probs = torch.softmax((x @ self.router.t()).float(), dim=-1)
        w, ids = torch.topk(probs, self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.e)
        padded = (counts + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        ends = torch.cumsum(padded, 0).to(torch.int32)
        starts_pad = ends - padded
        starts = torch.cumsum(counts, 0) - counts
        sorted_e = flat[order]
        rank = torch.arange(flat.numel(), device=x.device) - starts[sorted_e]
        dest = starts_pad[sorted_e] + rank
        cap = flat.numel() + self.e * (self.ALIGN - 1)  # static upper bound: no host sync
        x_pad = x.new_zeros(cap, d)
        x_pad[dest] = x[order // self.k]
        h = torch._grouped_mm(x_pad, self.w_gate_up, offs=ends)
        a = F.silu(h[:, : self.f]) * h[:, self.f:]
        y_pad = torch._grouped_mm(a, self.w_down, offs=ends)
        y = x.new_zeros(T, d)
        y.index_add_(0, order // self.k, y_pad[dest] * w.reshape(-1)[order].unsqueeze(-1))
        return y


class SwiGLU(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)
        self.f = f

    def forward(self, x):
        h = self.gate_up(x)
        return self.down(F.silu(h[..., : self.f]) * h[..., self.f:])


def deepspeed_moe(d, f, e, k, T):
    if k > 2:
        return None
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
    except Exception as ex:  # not installed
        print(f"# deepspeed unavailable: {ex}")
        return None
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="nccl")
    # capacity_factor large enough to keep every token (dropless-equivalent work).
    m = MoE(hidden_size=d, expert=SwiGLU(d, f), num_experts=e, ep_size=1, k=k,
            capacity_factor=float(e), eval_capacity_factor=float(e), min_capacity=4, drop_tokens=False, use_rts=False)
    return m


def run(shape, reps):
    d, f, e, k, T = (int(v) for v in shape.split(":"))
    dev = torch.device("cuda")
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    flops = 2.0 * T * k * d * 3 * f + 2.0 * T * d * e
    active = min(e, T * k)
    floor = max(3 * flops / (PEAK_TFLOPS * 1e12), 3 * active * 3 * f * d * 2 / (PEAK_TBS * 1e12)) * 1e3
    rows = []
    m = GroupedMoE(d, f, e, k).to(dev, torch.bfloat16)

    def fb_grouped():
        if SET_TO_NONE:
            m.zero_grad(set_to_none=True)
        m(x).backward(dy)

    rows.append(("torch._grouped_mm", median_ms(lambda: m(x), reps=reps), median_ms(fb_grouped, reps=reps)))
    del m
    ds = deepspeed_moe(d, f, e, k, T)
    if ds is not None:
        ds = ds.to(dev, torch.bfloat16)
        fwd = lambda: ds(x)[0]
        rows.append(("deepspeed-moe", median_ms(fwd, reps=reps), median_ms(lambda: ds(x)[0].backward(dy), reps=reps)))
        del ds
    else:
        rows.append(("deepspeed-moe", None, None))
    for name, fw, fb in rows:
        if fw is None:
            print(f"{shape:<24} {name:<18} {'n/a':>9} {'n/a':>9}")
        else:
            print(f"{shape:<24} {name:<18} {fw:9.3f} {fb:9.3f} {flops / fw / 1e9:10.1f} {3 * flops / fb / 1e9:10.1f} {floor:9.3f} {fb / floor:9.2f}")
    torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(DEFAULT))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--set-to-none", action="store_true",
                    help="weight .grads set to None before each backward (written, not accumulated: "
                         "moe's --write-grads)")
    args = ap.parse_args()
    SET_TO_NONE = args.set_to_none
    print(f"{'shape d:F:E:k:T':<24} {'peer':<18} {'fwd ms':>9} {'f+b ms':>9} {'fwd TF/s':>10} {'f+b TF/s':>10} {'floor ms':>9} {'f+b/floor':>9}")
    for s in args.shapes.split(","):
        run(s, args.reps)
