#!/usr/bin/env python3
"""Hugging Face `datasets` as the tests' independent side.

    hf_datasets.py save JSONL OUT   # JSONL's documents as `datasets` writes them
    hf_datasets.py splits ROOT      # the splits `datasets` finds in ROOT, as JSON

`save` loads the JSON lines with `load_dataset("json")` and writes, under
OUT:
  saved/  the Dataset with `save_to_disk` in three shards;
  dict/   a DatasetDict (train: every document; validation: the first 7)
          with `save_to_disk`;
  hub/    a Hub snapshot's layout: `data/train-0000i-of-00002.parquet` and
          `data/validation-00000-of-00001.parquet` written by `to_parquet`,
          with a README.md beside them.

`splits` prints `{split: [path relative to ROOT, ...]}` as the library's
`get_data_patterns` resolves a folder without a `configs` list.
"""

import json
import os
import sys
import tempfile


def save(jsonl, out):
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:
        ds = datasets.load_dataset("json", data_files=jsonl, split="train", cache_dir=cache)
        ds.save_to_disk(os.path.join(out, "saved"), num_shards=3)
        validation = ds.select(range(7))
        datasets.DatasetDict({"train": ds, "validation": validation}).save_to_disk(
            os.path.join(out, "dict")
        )
        data = os.path.join(out, "hub", "data")
        os.makedirs(data)
        for i in range(2):
            ds.shard(2, i, contiguous=True).to_parquet(
                os.path.join(data, f"train-{i:05d}-of-00002.parquet")
            )
        validation.to_parquet(os.path.join(data, "validation-00000-of-00001.parquet"))
        with open(os.path.join(out, "hub", "README.md"), "w") as f:
            f.write("---\nlicense: pd\n---\n# A corpus\n")
    print(json.dumps({"datasets": datasets.__version__, "rows": len(ds)}))


def splits(root):
    from datasets.data_files import DataFilesDict, get_data_patterns

    patterns = get_data_patterns(root)
    files = DataFilesDict.from_patterns(patterns, base_path=root)
    print(
        json.dumps(
            {
                str(split): sorted(os.path.relpath(f, root) for f in found)
                for split, found in files.items()
            }
        )
    )


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    {"save": save, "splits": splits}[mode](*args)
