#!/usr/bin/env python3
"""Peer for `moe bench train`: one PyTorch training step of an OLMoE-1B-7B-shaped model
(d 2048, 16 heads, 64 experts top-8, expert FFN 1024, vocab 50304; fewer layers), same columns.
HF OlmoeForCausalLM built from its config (random init), bf16 weights, SDPA attention, experts
through torch._grouped_mm (`experts_implementation="grouped_mm"`, transformers >= 5), router
aux loss on (coef 0.01, as OLMoE), fused torch.optim.AdamW on the bf16 parameters.
Timing: CUDA events around `--steps` steps after `--warmup` steps.
FLOPs per token = 6 * active params + 6 * layers * heads * head_dim * seq (causal attention,
forward + backward): the count `moe bench train` uses. MFU over 816 TFLOP/s (H200 bf16 dense).
Usage on the GPU machine: python3 scripts/peers/train_step_torch.py [--layers 8 --batch 4 --seq 2048]
Pinned: torch 2.11, transformers 5.17.
"""
import argparse
import time

import torch
import transformers
from transformers import OlmoeConfig, OlmoeForCausalLM

PEAK_FLOPS = 816e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = OlmoeConfig(
        num_hidden_layers=args.layers,
        hidden_size=2048,
        intermediate_size=1024,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        vocab_size=50304,
        max_position_embeddings=max(4096, args.seq),
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    kwargs = dict(attn_implementation="sdpa", dtype=torch.bfloat16)
    try:
        model = OlmoeForCausalLM._from_config(cfg, experts_implementation="grouped_mm", **kwargs)
        experts = "grouped_mm"
    except (TypeError, ValueError) as e:
        print(f"# experts_implementation=grouped_mm unavailable ({e}); using the default")
        model = OlmoeForCausalLM._from_config(cfg, **kwargs)
        experts = "eager"
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev.type == "cuda")

    total = sum(p.numel() for p in model.parameters())
    inactive = (cfg.num_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.intermediate_size * args.layers
    active = total - inactive
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    flops_per_token = 6 * active + 6 * args.layers * cfg.num_attention_heads * head_dim * args.seq

    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(dev)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step():
        out = model(input_ids=x, labels=y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
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
    tokens = args.batch * args.seq * args.steps
    tps = tokens / secs
    mfu = tps * flops_per_token / PEAK_FLOPS
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, experts {experts}, "
          f"sdpa, bf16 params + fused AdamW; active params {active / 1e6:.1f}M of {total / 1e6:.1f}M; "
          f"{flops_per_token / 1e9:.3f} GFLOP/token")
    print(f"{'engine':<26} {'layers':>6} {'batch x seq':>12} {'step ms':>9} {'tokens/s':>10} {'MFU %':>7} {'peak GiB':>9} {'loss':>8}")
    print(f"{'torch (HF OLMoE)':<26} {args.layers:>6} {f'{args.batch}x{args.seq}':>12} {secs / args.steps * 1e3:9.1f} "
          f"{tps:10.0f} {100 * mfu:7.1f} {mem:9.1f} {loss.item():8.4f}")


if __name__ == "__main__":
    main()
