#!/usr/bin/env python3
"""Peer for `moe bench generate`: HF transformers `generate` on the same checkpoint, greedy, EOS ignored,
random prompt ids, bf16, SDPA attention. The model is loaded once with plain
`from_pretrained(dir, dtype=bf16, attn_implementation="sdpa")`, then `.to(device)` (the experts
implementation its config then reports is printed), and each variant is run per batch size:
  * `default`: as loaded (dynamic KV cache, no compile);
  * `experts=X`: `model.set_experts_implementation(X)` for X in grouped_mm, batched_mm, eager (transformers
    5.17's ExpertsInterface; deepgemm and sonicmoe need kernels from the hub, not on the GPU machine); the
    one plain loading already chose is not run twice;
  * `static+compile experts=X`: `generate(..., cache_implementation="static", compile_config=CompileConfig())`,
    transformers 5.x's documented fast-generation path (a static KV cache; the decode steps' forward
    compiled by generate itself, mode "reduce-overhead" = CUDA graphs; prefill eager). CUDA only; on the CPU
    generate does not compile and the row says so.
Timing per (variant, batch): one untimed warm-up generate (static: of the full length, the cache's size,
where compilation and CUDA-graph capture land, their wall time printed; else of 4 tokens), then generate of
1 token (= prefill: prefill tok/s) and of --new-tokens tokens; decode tok/s = batch * (new - 1) /
(t_new - t_1). Rows print as they finish (default first, then the likeliest fastest); "HF best" closes
each batch size. Greedy tokens of every variant are compared with `default`'s for the first
--check-tokens tokens (bf16 may diverge late: a mismatch is reported, not fatal).
    python3 scripts/peers/hf_generate.py MODEL_DIR [--prompt-len 512 --new-tokens 128 --batch 1,32]
        [--variants default,experts=grouped_mm,...] [--device cpu] [--compile-budget-s 300]
Pinned: torch 2.11, transformers 5.17.
"""
import argparse
import os
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceilings  # noqa: E402

# Likeliest fastest first after `default` (the token reference), so a run cut at its deadline loses the least.
VARIANTS = ["default", "static+compile experts=grouped_mm", "experts=grouped_mm", "experts=batched_mm",
            "static+compile experts=batched_mm", "experts=eager"]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, ids, n, dev, static):
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    if static:
        kw.update(cache_implementation="static", compile_config=transformers.CompileConfig())
    sync(dev)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kw)
    sync(dev)
    return time.perf_counter() - t, out[:, ids.shape[1]:]


def first_mismatch(out, ref, n):
    """'' when the first n tokens of every sequence agree, else where the first differs."""
    n = min(n, out.shape[1], ref.shape[1])
    diff = (out[:, :n] != ref[:, :n]).nonzero()
    if diff.numel() == 0:
        return ""
    seqs = diff[:, 0].unique().numel()
    return f"tokens differ from default: {seqs}/{out.shape[0]} sequences, first at token {diff[:, 1].min().item()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared with `default`'s")
    ap.add_argument("--compile-budget-s", type=float, default=300.0,
                    help="wall seconds the static+compile warm-ups may take together; later ones are skipped")
    a = ap.parse_args()
    dev = torch.device(a.device)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; expected some of {VARIANTS}")
    if "default" in variants:  # the reference for the token check runs first
        variants.remove("default")
    variants.insert(0, "default")
    print(ceilings.describe(dev)[0])
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(dev).eval()
    loaded = model.config._experts_implementation
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}: {a.model} loaded in "
          f"{time.perf_counter() - t:.1f} s; plain from_pretrained gives experts_implementation={loaded!r}, "
          f"attention {model.config._attn_implementation!r}")
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    compile_left = a.compile_budget_s
    print(f"{'batch':>6} {'prompt':>7} {'variant':<34} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>9}  note")
    for b in [int(x) for x in a.batch.split(",")]:
        ids = torch.randint(0, vocab, (b, a.prompt_len), generator=g).to(dev)
        rows, ref = [], None

        def row(v, pre=None, dec=None, ms=None, note=""):
            rows.append((v, dec))
            if pre is None:
                print(f"{b:>6} {a.prompt_len:>7} {v:<34} {'n/a':>14} {'n/a':>13} {'n/a':>9}  {note}", flush=True)
            else:
                print(f"{b:>6} {a.prompt_len:>7} {v:<34} {pre:>14.0f} {dec:>13.1f} {ms:>9.2f}  {note}", flush=True)

        for v in variants:
            static = v.startswith("static")
            impl = v.split("experts=")[1] if "experts=" in v else loaded
            note = ""
            if static and dev.type != "cuda":
                note = "static cache, not compiled (generate compiles on CUDA only)"
            if v == f"experts={loaded}":
                row(v, note="= default (what plain from_pretrained chose)")
                continue
            if static and dev.type == "cuda" and compile_left <= 0:
                row(v, note="skipped: --compile-budget-s spent")
                continue
            try:
                model.set_experts_implementation(impl)
                # Static: the full length (the cache's size, compilation, graph capture); else a short one.
                warm, _ = timed_generate(model, ids, a.new_tokens if static else 4, dev, static)
                if static and dev.type == "cuda":
                    compile_left -= warm
                    note = f"warm-up (compile + graph capture) {warm:.0f} s"
                t1, _ = timed_generate(model, ids, 1, dev, static)
                tn, out = timed_generate(model, ids, a.new_tokens, dev, static)
            except Exception as ex:  # report, keep going
                msg = str(ex).strip().splitlines()[0][:120] if str(ex).strip() else ""
                row(v, note=f"failed: {type(ex).__name__}: {msg}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if ref is None and v == "default":
                ref = out
            elif ref is not None:
                n = min(a.check_tokens, a.new_tokens)
                note = "; ".join(x for x in (note, first_mismatch(out, ref, n) or f"first {n} tokens = default's") if x)
            steps = a.new_tokens - 1
            decode = max(tn - t1, 1e-9)
            row(v, b * a.prompt_len / t1, b * steps / decode, 1e3 * decode / steps, note)
        done = [r for r in rows if r[1] is not None]
        if done:
            v, dec = max(done, key=lambda r: r[1])
            print(f"{b:>6} {a.prompt_len:>7} {'HF best':<34} {'':>14} {dec:>13.1f} {1e3 * b / dec:>9.2f}  {v}",
                  flush=True)
        model.set_experts_implementation(loaded)


if __name__ == "__main__":
    main()
