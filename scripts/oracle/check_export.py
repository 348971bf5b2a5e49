"""Checks a `moe train` HF export (RUN/hf) with transformers: the model loads, its logits match
ours (through `moe generate --json`: greedy ids must be identical) and the tokenizer round-trips.

    python scripts/oracle/check_export.py RUN/hf [path/to/moe]
"""
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    d = sys.argv[1]
    moe = sys.argv[2] if len(sys.argv) > 2 else "target/release/moe"
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    fails = 0
    for prompt in ["rev:hello=", "cp:abc=", "sort:dcba=", "add:12+34=", "bal:(()]="]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        want = out[0, ids.shape[1]:].tolist()
        r = subprocess.run([moe, "generate", "--model", d, "--device", "cpu", "--prompt", prompt,
                            "--max-new-tokens", "8", "--json", "--ignore-eos"],
                           capture_output=True, text=True, check=True)
        got = json.loads(r.stdout)
        ok = got["prompt_ids"] == ids[0].tolist() and got["completion_ids"] == want
        fails += not ok
        print(f"{'ok ' if ok else 'BAD'} {prompt!r}: transformers {tok.decode(want)!r} moe {got['text']!r}")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
