#!/usr/bin/env python3
"""Peer for `moe bench train`: one PyTorch training step of an OLMoE-1B-7B-shaped model
(d 2048, 16 heads, 64 experts top-8, expert FFN 1024, vocab 50304; fewer layers), same columns.
HF OlmoeForCausalLM built from its config (random init, seed 0), bf16 weights, SDPA attention, experts
through torch._grouped_mm (`experts_implementation="grouped_mm"`), router aux loss on (coef 0.01, as
OLMoE), fused torch.optim.AdamW on the bf16 parameters, grads set to None after each step. Variants:
  * `eager`;
  * `compile-layers`: each decoder layer `.compile()`d (torchtitan's way; one graph shared by the layers);
  * `compile-model`: the whole model `.compile()`d (graph breaks allowed).
Each variant starts from the same initial weights and batch; the first step's loss is printed beside the
eager one's (a compiled model computing something else shows there). The fastest variant is marked.
Timing: CUDA events around `--steps` steps after `--warmup` steps (compilation lands in the warm-up,
whose wall time is printed). FLOPs per token = 6 * active params + 6 * layers * heads * head_dim * seq
(causal attention, forward + backward): the count `moe bench train` uses. MFU over the bf16 GEMM
ceiling measured in the same run (torch.mm 8192^3, scripts/peers/ceilings.py) or --peak-tflops.
    python3 scripts/peers/train_step_torch.py [--layers 8 --batch 4 --seq 2048] [--variants eager,compile-layers]
Pinned: torch 2.11, transformers 5.17.
"""
import argparse
import os
import sys
import time

import torch
import transformers
from transformers import OlmoeConfig, OlmoeForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceilings  # noqa: E402

VARIANTS = ["eager", "compile-layers", "compile-model"]


def build(cfg, variant, dev):
    torch.manual_seed(0)
    with dev:  # initialised where it trains
        model = OlmoeForCausalLM._from_config(cfg, experts_implementation="grouped_mm", attn_implementation="sdpa",
                                              dtype=torch.bfloat16)
    model.train()
    if variant == "compile-layers":
        for layer in model.model.layers:
            layer.compile()
    elif variant == "compile-model":
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")
    return model, opt


def run(cfg, variant, args, dev, x, y):
    """(step ms, first step's loss, last loss, peak GiB, warm-up s, parameters)."""
    model, opt = build(cfg, variant, dev)
    params = sum(p.numel() for p in model.parameters())

    def step():
        out = model(input_ids=x, labels=y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    first = step().item()
    for _ in range(args.warmup - 1):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(args.steps):
            loss = step()
        b.record()
        torch.cuda.synchronize()
        secs = a.elapsed_time(b) / 1e3
        mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        t = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        secs = time.perf_counter() - t
        mem = float("nan")
    last = loss.item()
    return secs / args.steps * 1e3, first, last, mem, warm, params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--d-model", type=int, default=2048, help="2048 = OLMoE; smaller for a quick CPU check")
    ap.add_argument("--variants", default="eager,compile-layers", help=f"comma separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--peak-tflops", type=float, help="bf16 peak for MFU (default: torch.mm 8192^3 measured now)")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants) or not variants:
        ap.error(f"--variants: expected some of {VARIANTS}, got {args.variants!r}")
    args.warmup = max(args.warmup, 1)
    dev = torch.device(args.device)
    line, measured, _ = ceilings.describe(dev)
    print(line)
    peak = (args.peak_tflops or measured) * 1e12
    d = args.d_model
    cfg = OlmoeConfig(
        num_hidden_layers=args.layers,
        hidden_size=d,
        intermediate_size=d // 2,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        vocab_size=50304,
        max_position_embeddings=max(4096, args.seq),
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(dev)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    rows, total = [], None
    for v in variants:
        try:
            *r, total = run(cfg, v, args, dev, x, y)
            rows.append((v, *r, ""))
        except Exception as ex:  # report, keep going
            msg = str(ex).strip().splitlines()[0][:120] if str(ex).strip() else ""
            rows.append((v, None, None, None, None, None, f"failed: {type(ex).__name__}: {msg}"))
        if dev.type == "cuda":  # the variant's model and optimizer went with run()'s frame
            torch.cuda.empty_cache()
    inactive = (cfg.num_experts - cfg.num_experts_per_tok) * 3 * d * cfg.intermediate_size * args.layers
    active = (total or 0) - inactive
    head_dim = d // cfg.num_attention_heads
    flops_per_token = 6 * active + 6 * args.layers * cfg.num_attention_heads * head_dim * args.seq
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, experts grouped_mm, sdpa, bf16 "
          f"params + fused AdamW, grads set to None; active params {active / 1e6:.1f}M of {(total or 0) / 1e6:.1f}M; "
          f"{flops_per_token / 1e9:.3f} GFLOP/token; MFU over {peak / 1e12:.1f} TFLOP/s "
          f"({'given' if args.peak_tflops else 'measured'})")
    print(f"{'engine':<34} {'layers':>6} {'batch x seq':>12} {'step ms':>9} {'tokens/s':>10} {'MFU %':>7} "
          f"{'peak GiB':>9} {'loss 1':>8} {'loss':>8} {'warm-up s':>9}")
    done = [r for r in rows if r[1] is not None]
    best = min(done, key=lambda r: r[1]) if done else None
    ref_loss = next((r[2] for r in done if r[0] == "eager"), None)
    for r in rows:
        v, ms, first, last, mem, warm, note = r
        name = f"torch (HF OLMoE) {v}"
        shape = f"{args.batch}x{args.seq}"
        if ms is None:
            print(f"{name:<34} {args.layers:>6} {shape:>12} {'n/a':>9}  {note}")
            continue
        tps = args.batch * args.seq / (ms * 1e-3)
        if ref_loss is not None and v != "eager":
            note = f"step-1 loss - eager's: {first - ref_loss:+.2e}"
        print(f"{name:<34} {args.layers:>6} {shape:>12} {ms:9.1f} {tps:10.0f} {100 * tps * flops_per_token / peak:7.1f} "
              f"{mem:9.1f} {first:8.4f} {last:8.4f} {warm:9.1f}  {'best ' if r is best else ''}{note}")


if __name__ == "__main__":
    main()
