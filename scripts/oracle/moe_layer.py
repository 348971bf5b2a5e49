#!/usr/bin/env python3
"""Oracle for the MoE layer: a plain PyTorch reference (float64, autograd), written from the HF
(Mixtral / Qwen2-MoE / DeepSeek-V3) and DeepSpeed-MoE (top-k gating with capacity) definitions.

Writes tests/fixtures/moe_layer/<case>.json (the MoeConfig, serde form) and <case>.safetensors:
  x, dy, y, aux, z, w.<name> (weights, f32), grad.<name> and grad.x (f32) where the loss is
  L = sum(y * dy) + aux + z.  Names follow moe::MoeWeights' ParamSet names.
Run: /work/pyenv/bin/python scripts/oracle/moe_layer.py   (torch 2.11, safetensors)
"""
import json
import math
import os

import torch
from safetensors.torch import save_file

assert torch.__version__.startswith("2.11"), torch.__version__
torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "moe_layer")


def silu(x):
    return x * torch.sigmoid(x)


def expert_mlp(cfg, x, w1, b1, w2, b2):
    h = x @ w1.T + (b1 if b1 is not None else 0)
    if cfg["expert"] == "swiglu":
        f = cfg["ffn_dim"] if w2.shape[1] == cfg["ffn_dim"] else w2.shape[1]
        a = silu(h[:, :f]) * h[:, f:]
    else:
        act = cfg["expert"]["mlp"]
        a = torch.nn.functional.gelu(h) if act == "gelu" else torch.nn.functional.gelu(h, approximate="tanh")
    return a @ w2.T + (b2 if b2 is not None else 0)


def swiglu_mlp(x, w1, w2):
    f = w2.shape[1]
    h = x @ w1.T
    return (silu(h[:, :f]) * h[:, f:]) @ w2.T


def route(cfg, logits, bias):
    """-> (ids [T,k], gates [T,k] differentiable, kept [T,k] bool, aux, z, weights [T,k])"""
    T, E = logits.shape
    k = cfg["top_k"]
    r = cfg["router"]
    lse = torch.logsumexp(logits, dim=-1)
    z = cfg["z_loss_coeff"] * (lse ** 2).mean()
    probs = torch.softmax(logits, dim=-1)
    aux = torch.zeros(())
    kept = torch.ones(T, k, dtype=torch.bool)
    if r["kind"] == "softmax":
        gates, ids = torch.topk(probs, k, dim=-1)
        w = gates / gates.sum(-1, keepdim=True) if r["renormalize"] else gates
        if cfg["aux_loss_coeff"] > 0:
            # HF load_balancing_loss_func for one layer: E * sum_e (count_e / T) * mean_t p[t,e]
            counts = torch.zeros(E).index_add_(0, ids.reshape(-1), torch.ones(T * k))
            aux = cfg["aux_loss_coeff"] * E * ((counts / T) * probs.mean(0)).sum()
    elif r["kind"] == "sigmoid":
        scores = torch.sigmoid(logits)
        choice = scores.detach() + bias
        G, TG = r["n_group"], r["topk_group"]
        if G > 1:
            gs = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(-1)
            gidx = torch.topk(gs, TG, dim=-1)[1]
            gmask = torch.zeros(T, G).scatter_(1, gidx, 1.0)
            smask = gmask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
            choice = choice.masked_fill(smask == 0, 0.0)
        ids = torch.topk(choice, k, dim=-1)[1]
        gates = scores.gather(1, ids)
        w = gates / (gates.sum(-1, keepdim=True) + 1e-20) if r["renormalize"] else gates
        w = w * r["routed_scaling_factor"]
    else:  # switch top-1 / top-2 with capacity, no noise (DeepSpeed top1gating / top2gating)
        i1 = torch.argmax(logits, dim=-1)
        ids = [i1]
        if k == 2:
            masked = logits.masked_fill(torch.nn.functional.one_hot(i1, E).bool(), float("-inf"))
            ids.append(torch.argmax(masked, dim=-1))
        ids = torch.stack(ids, dim=1)
        gates = probs.gather(1, ids)
        cap = max(math.ceil(k * T / E * r["capacity_factor"]), r["min_capacity"])
        # first choices queue before second choices, in token order
        fill = [0] * E
        for j in range(k):
            for t in range(T):
                e = int(ids[t, j])
                kept[t, j] = fill[e] < cap
                fill[e] += 1
        m = kept.double()
        if k == 2:
            denom = (gates * m).sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
            w = gates * m / denom
        else:
            w = gates * m
        if cfg["aux_loss_coeff"] > 0:
            ce = torch.zeros(E).index_add_(0, ids[:, 0], torch.ones(T)) / T
            aux = cfg["aux_loss_coeff"] * E * (probs.mean(0) * ce).sum()
    return ids, kept, aux, z, w


def moe(cfg, W, x):
    T, d = x.shape
    logits = x @ W["router"].T
    ids, kept, aux, z, w = route(cfg, logits, W.get("router_bias"))
    y = torch.zeros(T, d)
    for e in range(cfg["n_experts"]):
        sel = (ids == e) & kept
        tok, slot = torch.nonzero(sel, as_tuple=True)
        if len(tok) == 0:
            continue
        out = expert_mlp(cfg, x[tok], W["w1"][e], W["b1"][e] if "b1" in W else None, W["w2"][e], W["b2"][e] if "b2" in W else None)
        y = y.index_add(0, tok, out * w[tok, slot].unsqueeze(-1))
    if "shared.mlp.w1" in W:
        ys = swiglu_mlp(x, W["shared.mlp.w1"], W["shared.mlp.w2"])
        if "shared.gate" in W:
            ys = torch.sigmoid(x @ W["shared.gate"].T) * ys
        y = y + ys
    if "residual.mlp.w1" in W:
        ym = expert_mlp(cfg, x, W["residual.mlp.w1"], None, W["residual.mlp.w2"], None)
        coef = torch.softmax(x @ W["residual.coef"].T + W["residual.coef_bias"], dim=-1)
        y = y * coef[:, 0:1] + ym * coef[:, 1:2]
    return y, aux, z


def case(name, cfg, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, E, F = cfg["d_model"], cfg["n_experts"], cfg["ffn_dim"]
    H1 = 2 * F if cfg["expert"] == "swiglu" else F
    rn = lambda *s, std=0.3: (torch.randn(*s, generator=g) * std).float().double()
    W = {"router": rn(E, d, std=0.5), "w1": rn(E, H1, d), "w2": rn(E, d, F)}
    if cfg.get("expert_bias"):
        W["b1"], W["b2"] = rn(E, H1, std=0.1), rn(E, d, std=0.1)
    if cfg["router"]["kind"] == "sigmoid":
        W["router_bias"] = rn(E, std=0.2)
    if cfg.get("shared"):
        fs = cfg["shared"]["ffn_dim"] * cfg["shared"].get("count", 1)
        W["shared.mlp.w1"], W["shared.mlp.w2"] = rn(2 * fs, d), rn(d, fs)
        if cfg["shared"].get("gated"):
            W["shared.gate"] = rn(1, d)
    if cfg.get("residual"):
        fr = cfg["residual"]["ffn_dim"]
        W["residual.mlp.w1"], W["residual.mlp.w2"] = rn(2 * fr if cfg["expert"] == "swiglu" else fr, d), rn(d, fr)
        W["residual.coef"], W["residual.coef_bias"] = rn(2, d), rn(2, std=0.1)
    x, dy = rn(T, d, std=1.0), rn(T, d, std=1.0)
    x.requires_grad_(True)
    for k_, v in W.items():
        if k_ != "router_bias":
            v.requires_grad_(True)
    y, aux, z = moe(cfg, W, x)
    loss = (y * dy).sum() + aux + z
    loss.backward()
    t = {"x": x, "dy": dy, "y": y, "aux": aux.reshape(1), "z": z.reshape(1), "grad.x": x.grad}
    for k_, v in W.items():
        t["w." + k_] = v
        if v.grad is not None:
            t["grad." + k_] = v.grad
    save_file({k_: v.detach().float().contiguous() for k_, v in t.items()}, os.path.join(OUT, name + ".safetensors"))
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(name, "y norm", float(y.norm()), "aux", float(aux), "z", float(z))


def base(**kw):
    c = dict(d_model=16, n_experts=8, top_k=2, ffn_dim=12, expert="swiglu", expert_bias=False,
             router={"kind": "softmax", "renormalize": True}, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    c.update(kw)
    return c


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    case("softmax_renorm", base(aux_loss_coeff=0.01, z_loss_coeff=0.001), seed=1)
    case("softmax_no_renorm", base(top_k=4, router={"kind": "softmax", "renormalize": False}, aux_loss_coeff=0.02), seed=2)
    case("sigmoid_group", base(router={"kind": "sigmoid", "n_group": 4, "topk_group": 2, "renormalize": True,
                                        "routed_scaling_factor": 2.5, "bias_update_rate": 0.001}, z_loss_coeff=0.001), seed=3)
    case("switch_top2_capacity", base(router={"kind": "switch", "capacity_factor": 0.5, "min_capacity": 1, "drop_tokens": True,
                                               "use_rts": False, "noisy_gate_policy": "none", "second_expert_noise": False},
                                      aux_loss_coeff=0.01), T=24, seed=4)
    case("switch_top1_capacity", base(top_k=1, router={"kind": "switch", "capacity_factor": 1.0, "min_capacity": 1, "drop_tokens": True,
                                                       "use_rts": False, "noisy_gate_policy": "none", "second_expert_noise": False},
                                      aux_loss_coeff=0.01), T=24, seed=5)
    case("shared_gated", base(router={"kind": "softmax", "renormalize": False}, shared={"ffn_dim": 10, "count": 2, "gated": True}), seed=6)
    case("gelu_bias", base(expert={"mlp": "gelu"}, expert_bias=True), seed=7)
    case("residual", base(top_k=1, residual={"ffn_dim": 20}), seed=8)
