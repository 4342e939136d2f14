#!/usr/bin/env python3
"""A random Hugging Face Llama, saved by transformers itself.

    python3 scripts/hf_make.py OUT_DIR CONFIG_JSON [--dtype float32|bfloat16]
        [--max-shard-size 1MB] [--seed N]

CONFIG_JSON is a JSON object of LlamaConfig fields (hidden_size,
num_hidden_layers, num_attention_heads, num_key_value_heads,
intermediate_size, vocab_size, max_position_embeddings, rope_theta,
tie_word_embeddings, ...). The weights are drawn far from the usual small
initialisation (N(0, 0.3) for matrices, 1 + N(0, 0.1) for norm gains) so
the model's predictions are sharp and a misplaced tensor shows in its
loss. `save_pretrained` writes config.json and safetensors (sharded when
larger than --max-shard-size). Prints JSON: the files and the dtype.

The import test (cli/tests/export.rs) reads such a folder with `strata
import` and `[init] from`; needs torch and transformers (pip).
"""

import argparse
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("config")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    config = LlamaConfig(**json.loads(a.config))
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight"):
                t.copy_(1.0 + 0.1 * torch.randn_like(t))
            else:
                t.copy_(0.3 * torch.randn_like(t))
    model = model.to(getattr(torch, a.dtype))
    model.save_pretrained(a.out, safe_serialization=True, max_shard_size=a.max_shard_size)
    print(
        json.dumps(
            {
                "files": sorted(os.listdir(a.out)),
                "dtype": str(next(model.parameters()).dtype),
                "tied": bool(model.config.tie_word_embeddings),
            }
        )
    )


if __name__ == "__main__":
    main()
