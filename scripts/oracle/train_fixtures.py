#!/usr/bin/env python3
"""Fixtures for tests/train_*.rs: a tiny byte-level BPE tokenizer.json (vocab 300, with an
<|endoftext|> special token) that `moe data prepare --tokenizer` must load and apply exactly as
the `tokenizers` Python package does; the expected ids of a sample text are written beside it.
Pinned: tokenizers 0.23 (Python; the Rust crate 0.22 reads the same tokenizer.json format). Run: python3 scripts/oracle/train_fixtures.py
"""
import json
import pathlib

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

assert tokenizers.__version__.startswith("0.23"), tokenizers.__version__

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/train"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "mixture of experts routes each token to the top k experts",
    "experts specialise when the router learns which tokens they handle best",
    "a small model trains on the synthetic tasks: copy, reverse, sort, add and brackets",
] * 20
SAMPLE = "the router sends tokens to experts.\nEach expert is a small MLP!"

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(CORPUS, trainer)
OUT.mkdir(parents=True, exist_ok=True)
tok.save(str(OUT / "tokenizer.json"))
ids = tok.encode(SAMPLE, add_special_tokens=False).ids
(OUT / "tokenizer_sample.json").write_text(json.dumps({
    "text": SAMPLE,
    "ids": ids,
    "vocab_size": tok.get_vocab_size(with_added_tokens=True),
    "eos_id": tok.token_to_id("<|endoftext|>"),
}, indent=1) + "\n")
print(f"vocab {tok.get_vocab_size()}, sample -> {len(ids)} ids")
