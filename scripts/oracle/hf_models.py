#!/usr/bin/env python3
"""Oracle for model loading and inference: tiny random checkpoints of every supported
architecture, made and run by HF transformers (pinned: torch 2.11, transformers 5.17), f32.

For each case writes tests/fixtures/hf/<case>/{config.json, model.safetensors} (save_pretrained)
and reference.json: {"prompts": [[ids]], "greedy": [[ids]]} + reference.safetensors with
"logits.<i>" = logits of every position of prompt i. Weights are re-drawn with std 0.15 (norm
weights 1 ± 0.1) so logits are peaked and greedy choices are far from ties.
Run: /work/pyenv/bin/python scripts/oracle/hf_models.py
"""
import json
import os

import torch
import transformers
from safetensors.torch import save_file

assert torch.__version__.startswith("2.11") and transformers.__version__.startswith("5.17"), (torch.__version__, transformers.__version__)
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "hf")
PROMPTS = [[5, 17, 99, 3, 42], [7, 1, 1, 64, 120, 2, 88, 31, 9], [11]]
NEW = 8

base = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=48, max_position_embeddings=128, rms_norm_eps=1e-6,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

CASES = {
    "llama_gqa_llama3rope": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2_bias_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen3_qknorm_linear_rope": (transformers.Qwen3Config, dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0})),
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "qwen2_moe_shared": (transformers.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                                          shared_expert_intermediate_size=40, norm_topk_prob=False,
                                                          decoder_sparse_step=2, num_hidden_layers=3, tie_word_embeddings=False)),
    "qwen3_moe_renorm": (transformers.Qwen3MoeConfig, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                                          norm_topk_prob=True, mlp_only_layers=[0], num_hidden_layers=3,
                                                          tie_word_embeddings=True)),
    "olmoe": (transformers.OlmoeConfig, dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                              "original_max_position_embeddings": 32})),
}


def main():
    for name, (cls, kw) in CASES.items():
        torch.manual_seed(0)
        cfg = cls(**{**base, **kw})
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.15 * torch.randn(p.shape, generator=g))
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d)
        ref = {"prompts": PROMPTS, "greedy": []}
        logits = {}
        with torch.no_grad():
            for i, pr in enumerate(PROMPTS):
                ids = torch.tensor([pr])
                logits[f"logits.{i}"] = model(ids).logits[0].float().contiguous()
                out = model.generate(ids, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
                ref["greedy"].append(out[0, len(pr):].tolist())
        save_file(logits, os.path.join(d, "reference.safetensors"))
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(ref, f)
        print(name, ref["greedy"])


if __name__ == "__main__":
    main()
