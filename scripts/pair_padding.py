"""Padding of preference batches, padded pairs vs packed pairs (`preference.pack_pairs`), and
the CPU step time of a small DPO run both ways.

    python scripts/pair_padding.py                       # the table of docs/performance.md
    python scripts/pair_padding.py CONFIG@DEVICES ...    # other configs (DEVICES: mesh size)
    python scripts/pair_padding.py --time [--steps 40]   # + the quickstart DPO step time

Each config is read one epoch (its train.batch_size pairs per step, its grad_accum, its mesh's
batch axes on DEVICES devices, one process). A config whose train file or tokenizer is not on
this machine (the 8B recipes) reads the quickstart preference data with the quickstart
tokenizer instead, at the config's sequence length and batch: the row says so.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the step time is a CPU measurement

from jaxalign import sharding as shd  # noqa: E402
from jaxalign.config import load_config  # noqa: E402
from jaxalign.data import load_tokenizer  # noqa: E402
from jaxalign.data.preference import PreferenceBatchIterator  # noqa: E402

QUICKSTART = REPO / "data" / "quickstart"
DEFAULT = [
    "configs/quickstart/dpo.yaml@1",
    "configs/quickstart/rm.yaml@1",
    "configs/recipes/dpo_8b_h100x8.yaml@8",
    "configs/recipes/dpo_8b_v5p64.yaml@32",
    "configs/recipes/dpo_8b_v5e256.yaml@256",
]


def batch_rows_multiple(cfg, devices: int) -> int:
    """The size of the batch mesh axes of `cfg` on `devices` devices."""
    sizes = shd.axis_sizes(cfg.mesh, devices)
    rules = shd.resolve_rules(cfg.sharding)
    return math.prod(sizes[a] for a in shd.activation_table(rules).get("batch", ()))


def padding(cfg, devices: int, pack: bool) -> dict:
    """Padding fraction and mean rows per step over one epoch of cfg's train data."""
    train_file, tokenizer, template = cfg.data.train_file, cfg.data.tokenizer, cfg.data.template
    stand_in = not (Path(train_file).is_file() and Path(tokenizer).exists())
    if stand_in:
        train_file = str(QUICKSTART / "pref_train.jsonl.gz")
        tokenizer, template = str(QUICKSTART / "tokenizer.model"), "plain"
    it = PreferenceBatchIterator(
        train_file,
        load_tokenizer(tokenizer),
        seq_len=cfg.train.seq_len,
        global_batch_size=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
        template=template,
        shuffle=cfg.data.shuffle,
        seed=cfg.data.seed,
        num_epochs=1,
        max_prompt_length=cfg.preference.max_prompt_length,
        too_long=cfg.preference.too_long,
        shards=cfg.data.shards,
        pack_pairs=pack,
        row_multiple=batch_rows_multiple(cfg, devices),
    )
    real = positions = rows = steps = 0
    for batch in it:
        real += int((batch["segment_ids"] > 0).sum())
        positions += batch["segment_ids"].size
        rows += batch["tokens"].shape[0] * batch["tokens"].shape[1]
        steps += 1
    return {
        "padding": 1 - real / positions,
        "rows": rows / steps,
        "row_len": it.row_len,
        "data": "quickstart (stand-in)" if stand_in else "its own",
    }


def step_times(steps: int) -> dict[bool, float]:
    """Median step time (s) of the quickstart DPO config from a random init, padded and packed,
    in this process, one after the other."""
    from jaxalign.trainers.dpo import DPO
    from jaxalign.trainers.loop import Trainer

    out = {}
    for pack in (False, True):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = load_config(
                REPO / "configs/quickstart/dpo.yaml",
                [
                    f"run_dir={run_dir}",
                    "init_from=null",
                    f"train.steps={steps}",
                    "train.log_every=5",
                    "train.eval_every=0",
                    "train.progress=false",
                    "logging.tensorboard=false",
                    f"preference.pack_pairs={str(pack).lower()}",
                ],
            )
            os.chdir(REPO)
            result = Trainer(cfg, DPO(cfg)).run()
            # Intervals after the first (compile and warm-up) step.
            out[pack] = statistics.median(r["step_time_s"] for r in result.history[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="*", default=DEFAULT, help="CONFIG@DEVICES")
    parser.add_argument("--time", action="store_true", help="also time the quickstart DPO step")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    os.chdir(REPO)
    print(
        "| config | devices | seq_len | pairs/step | data | padded: rows x len, padding "
        "| packed: rows x len (mean), padding |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec in args.configs:
        path, _, devices = spec.partition("@")
        cfg = load_config(path)
        devices = int(devices or 1)
        before, after = padding(cfg, devices, False), padding(cfg, devices, True)
        print(
            f"| `{path}` | {devices} | {cfg.train.seq_len} | {cfg.train.batch_size} "
            f"| {before['data']} | {before['rows']:.0f} x 2 x {cfg.train.seq_len}, "
            f"{before['padding']:.1%} | {after['rows']:.1f} x {after['row_len']}, "
            f"{after['padding']:.1%} |"
        )
    if args.time:
        times = step_times(args.steps)
        print(
            f"\nquickstart DPO step (CPU, {args.steps} steps, median of 5-step intervals): "
            f"padded {times[False]:.3f} s, packed {times[True]:.3f} s "
            f"({times[True] / times[False]:.2f}x)"
        )


if __name__ == "__main__":
    main()
