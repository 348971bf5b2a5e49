#!/usr/bin/env python3
"""Peer for `moe bench generate`: HF transformers `generate` on the same checkpoint, greedy, EOS
ignored, random prompt ids; prefill tok/s (one forward of the prompt) and decode tok/s
((new tokens - 1) / (generate time - prefill time)), batch 1 and 32. bf16, SDPA attention,
grouped_mm experts where transformers offers them. Pinned: torch 2.11, transformers 5.17.

    python3 scripts/peers/hf_generate.py MODEL_DIR [--prompt-len 512 --new-tokens 128 --batch 1,32]
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", default="1,32")
    a = ap.parse_args()
    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    try:
        model = AutoModelForCausalLM.from_pretrained(a.model, experts_implementation="grouped_mm", **kw)
        impl = "grouped_mm"
    except (TypeError, ValueError):
        model = AutoModelForCausalLM.from_pretrained(a.model, **kw)
        impl = "default"
    model = model.cuda().eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    print(f"transformers {a.model} experts={impl}")
    print(f"{'batch':>6} {'prompt':>8} {'prefill tok/s':>14} {'decode tok/s':>14} {'ms/step':>10}")
    for b in [int(x) for x in a.batch.split(",")]:
        ids = torch.randint(0, vocab, (b, a.prompt_len), generator=g).cuda()
        mask = torch.ones_like(ids)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model(ids, attention_mask=mask)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                           min_new_tokens=a.new_tokens, do_sample=False)
            torch.cuda.synchronize()
            total = time.perf_counter() - t
        decode = max(total - prefill, 1e-9)
        steps = a.new_tokens - 1
        print(f"{b:>6} {a.prompt_len:>8} {b * a.prompt_len / prefill:>14.0f} {b * steps / decode:>14.1f} "
              f"{1e3 * decode / steps:>10.2f}")


if __name__ == "__main__":
    main()
