#!/usr/bin/env python3
"""A short greedy generation from a `strata export` folder, as users load it.

    python3 scripts/hf_generate.py MODEL_DIR PROMPT

Loads the folder with `AutoTokenizer` and `AutoModelForCausalLM` exactly
as it is (as `lm_eval --model hf` does: no tokenizer or dtype given),
tokenizes PROMPT, and generates 8 tokens greedily with the folder's
generation config. Prints JSON: the prompt's ids, the new ids, the text,
and the dtype and special tokens transformers read.

Needs torch and transformers (pip); cli/tests/export.rs runs it where
they are installed.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    model_dir, prompt = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
        )
    new = out[0, ids.shape[1]:].tolist()
    print(
        json.dumps(
            {
                "prompt_ids": ids[0].tolist(),
                "new_ids": new,
                "text": tokenizer.decode(new),
                "dtype": str(model.dtype),
                "eos_token_id": model.generation_config.eos_token_id,
                "eos_token": tokenizer.eos_token,
            }
        )
    )


if __name__ == "__main__":
    main()
