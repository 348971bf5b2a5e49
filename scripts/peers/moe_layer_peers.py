#!/usr/bin/env python3
"""Peers for `moe bench moe-layer`, on the same shapes (d:F:E:k:T), bf16, CUDA-event medians. Every
variant of a torch._grouped_mm dropless MoE layer (softmax top-k renormalised, SwiGLU experts, autograd
backward) is run and printed; the fastest per shape is "torch best":
  * rows: `padded16` (each expert's rows padded to a multiple of 16 through a scatter, the old peer) or
    `gathered` (`x[token_of_slot]`, no padding, offsets = cumsum of the counts);
  * experts: `fused` gate_up weight [E, d, 2F] (one grouped GEMM) or `separate` gate and up weights;
  * combine: `index_add` (weighted rows added into y) or `sum` (rows put back in slot order, summed over k);
  * `compile[MODE]`: torch.compile(dynamic=False) of the fastest eager variant of the shape, MODE default and
    max-autotune-no-cudagraphs, within --compile-budget-s (compile time printed; skipped ones say so). Eager
    rows come first for every shape, then one compile pass per mode, then the "torch best" summary;
  * DeepSpeed-MoE (deepspeed.moe.layer.MoE, k <= 2) when importable; its own random weights, no numerics.
Columns: fwd; f+b with the weight .grads accumulated into (as moe's default) and set to None before each
step (moe's --write-grads); dx is always fresh. Numerics: every variant's y and dx against one fp32
reference of the same weights and the same expert choice (max |diff| / max |ref|, ok below --tol).
moe's `bench moe-layer` draws its own device-random weights and prints no outputs, so it is not compared
here: moe's layer is checked against its f32 CPU reference by tests/moe_cuda_parity.rs; both sides are
thus held to the same math. Floor = max(3 FLOPs / GEMM ceiling, 3 x routed expert bytes / copy ceiling),
ceilings measured in the same run (scripts/peers/ceilings.py) unless --peak-tflops/--peak-tbs are given.
    python3 scripts/peers/moe_layer_peers.py [--shapes d:F:E:k:T,...] [--device cpu] [--compile-budget-s 240]
(--device cpu: a smoke test of the same code on tiny shapes; compile mode default only, through inductor's C++.)
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceilings  # noqa: E402

DEFAULT = ["4096:14336:8:2:8192", "2048:768:128:8:8192", "2048:1024:64:8:8192", "2048:8192:128:1:8192",
           "2048:768:128:8:16"]
COMPILE_MODES = ["default", "max-autotune-no-cudagraphs"]
ALIGN = 16


def median_ms(fn, device, warmup=2, reps=10):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
    ts.sort()
    return ts[len(ts) // 2]


def route(x, router, k):
    """Softmax over bf16 logits, top-k, renormalised: (weights [T, k] in x's dtype, expert ids [T, k])."""
    probs = torch.softmax((x @ router.t()).float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).to(x.dtype), ids


class GroupedMoE(torch.nn.Module):
    """One eager variant; its parameters alias the shared weights (fused ones alias the shared cat)."""

    def __init__(self, weights, k, pad, fused, combine):
        super().__init__()
        self.k, self.pad, self.fused, self.combine = k, pad, fused, combine
        self.e, _, self.f = weights["gate"].shape
        p = torch.nn.Parameter
        self.router = p(weights["router"])
        if fused:
            self.w_gate_up = p(weights["gate_up"])
        else:
            self.w_gate, self.w_up = p(weights["gate"]), p(weights["up"])
        self.w_down = p(weights["down"])

    def name(self):
        return (f"{'padded16' if self.pad else 'gathered'} {'fused' if self.fused else 'separate'} "
                f"{self.combine}")

    def forward(self, x):
        T, d = x.shape
        w, ids = route(x, self.router, self.k)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // self.k
        counts = torch.zeros(self.e, dtype=flat.dtype, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        if self.pad:
            padded = (counts + ALIGN - 1) // ALIGN * ALIGN
            offs = torch.cumsum(padded, 0).to(torch.int32)
            starts = torch.cumsum(counts, 0) - counts
            sorted_e = flat[order]
            dest = offs[sorted_e] - padded[sorted_e] + torch.arange(flat.numel(), device=x.device) - starts[sorted_e]
            rows = x.new_zeros(flat.numel() + self.e * (ALIGN - 1), d)  # static bound: no host sync
            rows[dest] = x[token]
        else:
            offs = torch.cumsum(counts, 0).to(torch.int32)
            rows = x[token]
        if self.fused:
            h = torch._grouped_mm(rows, self.w_gate_up, offs=offs)
            a = F.silu(h[:, : self.f]) * h[:, self.f:]
        else:
            a = F.silu(torch._grouped_mm(rows, self.w_gate, offs=offs)) * torch._grouped_mm(rows, self.w_up, offs=offs)
        out = torch._grouped_mm(a, self.w_down, offs=offs)
        if self.pad:
            out = out[dest]
        out = out * w.reshape(-1)[order].unsqueeze(-1)
        if self.combine == "index_add":
            return x.new_zeros(T, d).index_add_(0, token, out)
        slots = out.new_zeros(T * self.k, d).index_copy_(0, order, out)
        return slots.view(T, self.k, d).sum(1)


def reference(x, dy, weights, k):
    """fp32 y and dx of the same layer with the expert choice of the bf16 logits (a near tie must not flip an
    expert between reference and variant). Expert dx by hand per expert (no fp32 weight copies kept);
    the router's path through autograd."""
    T, d = x.shape
    with torch.no_grad():
        _, ids = route(x, weights["router"], k)
    xf = x.detach().float().requires_grad_()
    probs = torch.softmax(xf @ weights["router"].float().t(), dim=-1)
    w = probs.gather(1, ids)
    w = w / w.sum(-1, keepdim=True)
    dyf = dy.float()
    outs = torch.zeros(T, k, d, device=x.device)
    dx = torch.zeros(T, d, device=x.device)
    with torch.no_grad():
        for e in range(weights["gate"].shape[0]):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            g_w, u_w, d_w = (weights[n][e].float() for n in ("gate", "up", "down"))
            h = xf[tok]
            g, u = h @ g_w, h @ u_w
            a = F.silu(g) * u
            outs[tok, slot] = a @ d_w
            da = (dyf[tok] * w[tok, slot].unsqueeze(-1)) @ d_w.t()
            sig = torch.sigmoid(g)
            dg = da * u * sig * (1 + g * (1 - sig))
            du = da * F.silu(g)
            dx.index_add_(0, tok, dg @ g_w.t() + du @ u_w.t())
    y = (w.unsqueeze(-1) * outs).sum(1)
    y.backward(dyf)
    return y.detach(), dx + xf.grad


def rel_err(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def deepspeed_moe(d, f, e, k):
    if k > 2:
        return None
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
    except Exception as ex:  # not installed
        print(f"# deepspeed unavailable: {ex}")
        return None

    class SwiGLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)
            self.down = torch.nn.Linear(f, d, bias=False)

        def forward(self, x):
            h = self.gate_up(x)
            return self.down(F.silu(h[..., :f]) * h[..., f:])

    if not torch.distributed.is_initialized():
        for key, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                       ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, v)
        deepspeed.init_distributed(dist_backend="nccl")
    # capacity_factor large enough to keep every token (dropless-equivalent work).
    return MoE(hidden_size=d, expert=SwiGLU(), num_experts=e, ep_size=1, k=k, capacity_factor=float(e),
               eval_capacity_factor=float(e), min_capacity=4, drop_tokens=False, use_rts=False)


class Runner:
    def __init__(self, args, device, peak_tflops, peak_tbs):
        self.a, self.dev, self.peak_tflops, self.peak_tbs = args, device, peak_tflops, peak_tbs
        self.compile_left = args.compile_budget_s

    def time_module(self, m, x, dy):
        """(fwd ms, f+b ms accumulating into .grad, f+b ms with .grad set to None first)."""
        reps, dev = self.a.reps, self.dev

        def fwd():
            m(x)

        def fb(set_to_none):
            def step():
                if set_to_none:
                    m.zero_grad(set_to_none=True)
                x.grad = None
                y = m(x)
                (y[0] if isinstance(y, tuple) else y).backward(dy)
            return step

        out = (median_ms(fwd, dev, reps=reps), median_ms(fb(False), dev, reps=reps),
               median_ms(fb(True), dev, reps=reps))
        m.zero_grad(set_to_none=True)
        x.grad = None
        return out

    def check(self, m, x, dy, ref):
        x.grad = None
        y = m(x)
        y.backward(dy)
        errs = rel_err(y.detach(), ref[0]), rel_err(x.grad, ref[1])
        m.zero_grad(set_to_none=True)
        x.grad = None
        return errs

    def setup(self, shape):
        """Seeded weights (the same on every pass), x, dy, the fp32 reference, FLOPs and floor of a shape."""
        d, f, e, k, T = (int(v) for v in shape.split(":"))
        dev, dt = self.dev, torch.bfloat16
        g = torch.Generator(device=dev).manual_seed(0)

        def randn(*s, std=0.02):
            return torch.randn(*s, device=dev, dtype=dt, generator=g) * std

        weights = {"router": randn(e, d), "gate": randn(e, d, f), "up": randn(e, d, f), "down": randn(e, f, d)}
        weights["gate_up"] = torch.cat([weights["gate"], weights["up"]], dim=-1)
        x = randn(T, d, std=1.0).requires_grad_()
        dy = randn(T, d, std=1.0)
        ref = reference(x, dy, weights, k) if self.a.tol > 0 else None
        flops = 2.0 * T * k * d * 3 * f + 2.0 * T * d * e
        active = min(e, T * k)
        floor = max(3 * flops / (self.peak_tflops * 1e12), 3 * active * 3 * f * d * 2 / (self.peak_tbs * 1e12)) * 1e3
        return (d, f, e, k, T), weights, x, dy, ref, flops, floor

    def eager(self, shape):
        """Every eager variant and DeepSpeed-MoE; returns (rows, flops, floor)."""
        (d, f, e, k, T), weights, x, dy, ref, flops, floor = self.setup(shape)
        rows = []  # (name, fwd, fb accumulate, fb set_to_none, y err, dx err, note)
        for pad, fused, combine in ((True, True, "index_add"), (False, True, "index_add"), (False, False, "index_add"),
                                    (False, True, "sum"), (False, False, "sum")):
            m = GroupedMoE(weights, k, pad, fused, combine)
            errs = self.check(m, x, dy, ref) if ref is not None else (None, None)
            rows.append((m.name(), *self.time_module(m, x, dy), *errs, ""))
            del m
        if self.dev.type == "cuda" and not self.a.no_deepspeed:
            ds = deepspeed_moe(d, f, e, k)
            if ds is None:
                rows.append(("deepspeed-moe", None, None, None, None, None, "n/a (k > 2 or not installed)"))
            else:
                ds = ds.to(self.dev, torch.bfloat16)
                rows.append(("deepspeed-moe", *self.time_module(ds, x, dy), None, None, "own random weights"))
                del ds
        self.release()
        return rows, flops, floor

    def compiled(self, shape, mode, variant):
        """torch.compile(mode, dynamic=False) of an eager variant: one row."""
        name = f"compile[{mode}] {variant}"
        if self.dev.type != "cuda" and mode != "default":
            return (name, None, None, None, None, None, "skipped: on the CPU only mode default is tried")
        if self.compile_left <= 0:
            return (name, None, None, None, None, None, "skipped: --compile-budget-s spent")
        (d, f, e, k, T), weights, x, dy, ref, _, _ = self.setup(shape)
        torch._dynamo.reset()
        pad, fused, combine = variant.split()
        m = GroupedMoE(weights, k, pad == "padded16", fused == "fused", combine)
        cm = torch.compile(m, mode=None if mode == "default" else mode, dynamic=False)
        t0 = time.perf_counter()
        try:
            if ref is not None:
                errs = self.check(cm, x, dy, ref)
            else:
                cm(x).backward(dy)
                errs = (None, None)
            if self.dev.type == "cuda":
                torch.cuda.synchronize()
            spent = time.perf_counter() - t0
            self.compile_left -= spent
            row = (name, *self.time_module(cm, x, dy), *errs, f"compiled in {spent:.0f} s")
        except Exception as ex:  # report, keep going
            self.compile_left -= time.perf_counter() - t0
            msg = str(ex).strip().splitlines()[0][:100] if str(ex).strip() else ""
            row = (name, None, None, None, None, None, f"failed: {type(ex).__name__}: {msg}")
        del m, cm
        torch._dynamo.reset()
        self.release()
        return row

    def release(self):
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def ok(self, r):
        tol = self.a.tol
        return r[1] is not None and (r[4] is None or (r[4] < tol and r[5] < tol)) and not r[0].startswith("deep")

    def print_rows(self, shape, rows, flops, floor, marks):
        """Rows of one shape; `marks`: the rows to mark fastest against (all of the shape's so far)."""
        tol = self.a.tol
        fine = [r for r in marks if self.ok(r)]
        best = {i: min(fine, key=lambda r: r[i]) if fine else None for i in (1, 2, 3)}
        for r in rows:
            name, fw, fb, fbn, ey, ex, note = r
            if fw is None:
                print(f"{shape:<22} {name:<64} {'n/a':>8} {'n/a':>8} {'n/a':>8} {'':>8} {'':>8} {'':>8} {'':>7} {'':>9}"
                      f" {'':>9}  {note}", flush=True)
                continue
            err = "" if ey is None else f"{ey:9.2e} {ex:9.2e}"
            mark = "".join(c for i, c in ((1, "F"), (2, "A"), (3, "N")) if best[i] is r)
            if ey is not None and not (ey < tol and ex < tol):
                note = f"NUMERICS ABOVE {tol:g} {note}".strip()
            print(f"{shape:<22} {name:<64} {fw:8.3f} {fb:8.3f} {fbn:8.3f} {flops / fw / 1e9:8.1f} "
                  f"{3 * flops / min(fb, fbn) / 1e9:8.1f} {floor:8.3f} {fb / floor:7.2f} {err:>19}  {mark} {note}",
                  flush=True)

    def print_best(self, shape, rows, flops, floor, label):
        fine = [r for r in rows if self.ok(r)]
        if not fine:
            print(f"{shape:<22} {label:<64} no variant ran with numerics ok", flush=True)
            return
        b = {i: min(fine, key=lambda r: r[i]) for i in (1, 2, 3)}
        print(f"{shape:<22} {label:<64} {b[1][1]:8.3f} {b[2][2]:8.3f} {b[3][3]:8.3f} {flops / b[1][1] / 1e9:8.1f} "
              f"{3 * flops / min(b[2][2], b[3][3]) / 1e9:8.1f} {floor:8.3f} {b[2][2] / floor:7.2f}  fwd: {b[1][0]}; "
              f"acc: {b[2][0]}; none: {b[3][0]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(DEFAULT))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tol", type=float, default=2e-2,
                    help="max |variant - fp32 reference| / max |reference| for y and dx (0: skip the check)")
    ap.add_argument("--compile-modes", default=",".join(COMPILE_MODES),
                    help="torch.compile modes tried on each shape's fastest eager variant ('' for none)")
    ap.add_argument("--compile-budget-s", type=float, default=240.0,
                    help="wall seconds all compilations together may take; later ones are skipped and say so")
    ap.add_argument("--peak-tflops", type=float, help="GEMM ceiling for the floor (default: measured now)")
    ap.add_argument("--peak-tbs", type=float, help="copy ceiling, TB/s read+written (default: measured now)")
    ap.add_argument("--no-deepspeed", action="store_true")
    a = ap.parse_args()
    a.compile_modes = [m for m in a.compile_modes.split(",") if m]
    dev = torch.device(a.device)
    line, tflops, tbs = ceilings.describe(dev)
    print(line)
    tflops, tbs = a.peak_tflops or tflops, a.peak_tbs or tbs
    print(f"# floor from {tflops:.1f} TFLOP/s and {tbs:.3f} TB/s; bf16; median of {a.reps}; numerics tol {a.tol:g}; "
          f"compile budget {a.compile_budget_s:.0f} s for modes {a.compile_modes or 'none'} (dynamic=False)")
    print("# f+b acc: weight .grads accumulated into; f+b none: set to None before each step; marks: fastest "
          "F fwd, A f+b acc, N f+b none (numerics ok only); f+b TF/s from the faster f+b")
    print(f"{'shape d:F:E:k:T':<22} {'variant':<64} {'fwd ms':>8} {'f+b acc':>8} {'f+b none':>8} {'fwd TF/s':>8} "
          f"{'f+b TF/s':>8} {'floor ms':>8} {'acc/flr':>7} {'y err':>9} {'dx err':>9}")
    r = Runner(a, dev, tflops, tbs)
    shapes = a.shapes.split(",")
    done = {}  # shape -> (rows, flops, floor); eager first for every shape, then the compile passes
    for s in shapes:
        done[s] = r.eager(s)
        r.print_rows(s, *done[s], done[s][0])
        r.print_best(s, *done[s], "torch best eager")
    for mode in a.compile_modes:
        for s in shapes:
            rows, flops, floor = done[s]
            eager = [x for x in rows if r.ok(x) and not x[0].startswith(("compile", "deep"))]
            if not eager:
                continue
            row = r.compiled(s, mode, min(eager, key=lambda x: x[2])[0])
            rows.append(row)
            r.print_rows(s, [row], flops, floor, rows)
    print("# torch best per shape over every variant above (numerics ok)")
    for s in shapes:
        r.print_best(s, *done[s], "torch best")


if __name__ == "__main__":
    main()
