#!/usr/bin/env python3
"""The mean next-token loss of a Hugging Face checkpoint on exact tokens.

    python3 scripts/hf_eval.py MODEL_DIR TOKENS.json

MODEL_DIR is what `strata export` wrote; TOKENS.json a JSON array of
arrays of token ids, as `strata eval --tokens` takes. Each sequence's
tokens 1..n are predicted from those before, every predicted token
weighted alike, in float32 on the CPU. Prints JSON: loss, tokens,
sequences, and the model's config as transformers read it.

Needs torch and transformers (pip); the export round-trip test
(cli/tests/export.rs) runs it where they are installed.
"""

import json
import sys

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM


def main() -> None:
    model_dir, tokens_path = sys.argv[1], sys.argv[2]
    with open(tokens_path) as f:
        sequences = json.load(f)
    model = LlamaForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq], dtype=torch.long)
            logits = model(input_ids=ids[:, :-1]).logits[0].double()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(seq) - 1
    c = model.config
    print(
        json.dumps(
            {
                "loss": total / count,
                "tokens": count,
                "sequences": len(sequences),
                "tied": bool(c.tie_word_embeddings),
                "vocab_size": c.vocab_size,
                "num_key_value_heads": c.num_key_value_heads,
            }
        )
    )


if __name__ == "__main__":
    main()
