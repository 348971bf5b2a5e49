#!/usr/bin/env python3
"""Random-weight HF checkpoints for `moe bench generate` and its peer (run on the GPU machine):
Qwen3-30B-A3B shape (Qwen3MoeForCausalLM: d 2048, 128 experts top-8 of 768, GQA 32/4, head 128,
vocab 151936) and OLMoE-1B-7B shape (OlmoeForCausalLM: d 2048, 64 experts top-8 of 1024, 16
heads, vocab 50304) and Mixtral-8x7B shape (MixtralForCausalLM: d 4096, 8 experts top-2 of 14336, GQA
32/8, vocab 32000; only with --models mixtral), bf16, saved with save_pretrained (sharded
safetensors + index).

    python3 scripts/peers/make_checkpoints.py OUT_DIR [--qwen-layers 24] [--olmoe-layers 16]
        [--mixtral-layers 4] [--models qwen3,olmoe,mixtral]

Fewer layers keep the files inside the machine's disk; per-token decode cost scales with layers,
so tokens/s and the roofline ratio are computed for the layers present. Pinned: transformers 5.17.
"""
import argparse
import os

import torch
from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig, AutoModelForCausalLM


def save(cfg, path):
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="5GB")
    n = sum(p.numel() for p in model.parameters())
    print(f"{path}: {n / 1e9:.2f}B parameters")
    del model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--qwen-layers", type=int, default=24)
    ap.add_argument("--olmoe-layers", type=int, default=16)
    ap.add_argument("--mixtral-layers", type=int, default=4)
    ap.add_argument("--models", default="qwen3,olmoe", help="which of qwen3, olmoe, mixtral to write")
    a = ap.parse_args()
    models = a.models.split(",")
    torch.manual_seed(0)
    if "qwen3" in models:
        save(Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=a.qwen_layers, num_attention_heads=32, num_key_value_heads=4,
            head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
            max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
            tie_word_embeddings=False, eos_token_id=151645,
        ), os.path.join(a.out, "qwen3-30b-a3b-shape"))
    if "olmoe" in models:
        save(OlmoeConfig(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024,
            num_hidden_layers=a.olmoe_layers, num_attention_heads=16, num_key_value_heads=16,
            num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
            max_position_embeddings=4096, eos_token_id=50279,
        ), os.path.join(a.out, "olmoe-1b-7b-shape"))
    if "mixtral" in models:
        save(MixtralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=a.mixtral_layers, num_attention_heads=32, num_key_value_heads=8,
            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
            rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
        ), os.path.join(a.out, "mixtral-8x7b-shape"))

if __name__ == "__main__":
    main()
