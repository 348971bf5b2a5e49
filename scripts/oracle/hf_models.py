#!/usr/bin/env python3
"""Oracle for model loading and inference: tiny random checkpoints of every supported
architecture, made and run by HF transformers (pinned: torch 2.11, transformers 5.17), f32.

For each case writes tests/fixtures/hf/<case>/{config.json, model.safetensors} (save_pretrained)
and reference.json: {"prompts": [[ids]], "greedy": [[ids]]} + reference.safetensors with
"logits.<i>" = logits of every position of prompt i. Weights are re-drawn with std 0.15 (norm
weights 1 ± 0.1) so logits are peaked and greedy choices are far from ties.
Training case tests/fixtures/hf/train_qwen3_moe/: a tiny Qwen3-MoE (no aux loss, so both sides
define the same loss) and train_reference.safetensors with "tokens" [2, 12] (i32), "loss0", "grad.<hf
name>" for every parameter after one backward of model(tokens, labels=tokens), and "losses" [10]:
the loss before each of 10 torch.optim.AdamW steps (lr 1e-2, betas 0.9/0.95, eps 1e-8, weight decay
0.1 on every parameter).
Run: /work/pyenv/bin/python scripts/oracle/hf_models.py [case ...]   (no case: all, and the training case)
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
    # clip_qkv 0.5: with these weights most q/k/v entries exceed it, so the clamp shapes the logits.
    "olmoe_clip": (transformers.OlmoeConfig, dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                                  tie_word_embeddings=True, clip_qkv=0.5)),
}


def main(only=()):
    for name, (cls, kw) in CASES.items():
        if only and name not in only:
            continue
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


def train_case():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(**{**base, "num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 24, "norm_topk_prob": True, "mlp_only_layers": [0],
                                         "router_aux_loss_coef": 0.0, "tie_word_embeddings": True, "max_position_embeddings": 64})
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in pname else 0.15 * torch.randn(p.shape, generator=g))
    d = os.path.join(OUT, "train_qwen3_moe")
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d)
    tokens = torch.randint(0, 128, (2, 12), generator=g)
    model.train()
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    t = {"tokens": tokens.to(torch.int32), "loss0": out.loss.detach().reshape(1)}
    # transformers 5 holds experts fused in memory ([E, 2F, d] gate_up, [E, d, F] down) and saves
    # them per expert; name the gradients as the checkpoint names the weights.
    from safetensors.torch import load_file
    saved = load_file(os.path.join(d, "model.safetensors"))
    for n, p in model.named_parameters():
        gr = p.grad.detach().clone()
        if n.endswith("experts.gate_up_proj"):
            pre, f = n[: -len("gate_up_proj")], p.shape[1] // 2
            assert torch.equal(saved[pre + "0.gate_proj.weight"], p.detach()[0, :f]), "gate rows come first"
            for e in range(p.shape[0]):
                t[f"grad.{pre}{e}.gate_proj.weight"] = gr[e, :f]
                t[f"grad.{pre}{e}.up_proj.weight"] = gr[e, f:]
        elif n.endswith("experts.down_proj"):
            pre = n[: -len("down_proj")]
            for e in range(p.shape[0]):
                t[f"grad.{pre}{e}.down_proj.weight"] = gr[e]
        else:
            t["grad." + n] = gr
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    t["losses"] = torch.tensor(losses)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(d, "train_reference.safetensors"))
    print("train_qwen3_moe losses", [round(x, 4) for x in losses])


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
    if len(sys.argv) == 1:
        train_case()
