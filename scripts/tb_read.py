#!/usr/bin/env python3
"""A run's TensorBoard scalars, read by TensorBoard's own event reader.

    python3 scripts/tb_read.py RUN_DIR/tensorboard

Loads every event file in the folder with `EventAccumulator` (as
`tensorboard --logdir` does, orphaned steps of restarted attempts purged)
and prints JSON: {tag: [[step, value], ...]} for every scalar tag.
Needs the `tensorboard` package (pip); cli/tests/jobs.rs runs it where
it is installed.
"""

import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
    acc.Reload()
    out = {
        tag: [[e.step, e.value] for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
