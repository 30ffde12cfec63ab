"""Data pipeline throughput: tokenize + template, pack, and both, in tokens per second.

    python bench/data.py [--repeat 10] [--template chatml] [--workers 0 2]

The bundled SFT records (data/tiny/sft_train.jsonl) are repeated `--repeat` times. Measured:
- tokenize: rendering records through the chat template with the SentencePiece tokenizer, in
  this process, and with Grain worker processes (`mp_prefetch`) for each `--workers` count;
- pack: SFTBatchIterator's first-fit packing and batching of already-tokenized examples
  (tokens = non-padding tokens of the produced rows);
- end to end: building the iterator (read + validate + tokenize) and packing every token once.
Prints a table and writes bench/results/data.json. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import format_table, machine_info  # noqa: E402

TINY = ROOT / "data" / "tiny"


class Tokenize:
    """Render one record (a Grain map); loads the tokenizer lazily so it can be pickled to
    workers."""

    def __init__(self, tokenizer_path: str, template: str, seq_len: int):
        self.path, self.template, self.seq_len = tokenizer_path, template, seq_len
        self._tok = None

    def __call__(self, record):
        from jaxalign.data import load_tokenizer
        from jaxalign.data.pipeline import tokenize_records

        if self._tok is None:
            self._tok = load_tokenizer(self.path)
        examples, _ = tokenize_records(
            [record], self._tok, template=self.template, seq_len=self.seq_len, where="bench"
        )
        return len(examples[0]["inputs"]) if examples else 0


def tokenize_throughput(records, workers: int, template: str, seq_len: int) -> float:
    import grain

    ds = (
        grain.MapDataset.source(records)
        .map(Tokenize(str(TINY / "tokenizer.model"), template, seq_len))
        .batch(256, batch_fn=sum)
    )
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    start = time.perf_counter()
    tokens = sum(iter(it))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument(
        "--json", "--out", dest="out", default=str(ROOT / "bench" / "results" / "data.json")
    )
    args = parser.parse_args()
    from absl import flags

    from jaxalign.data import SFTBatchIterator, load_tokenizer, read_jsonl

    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags

    records = read_jsonl(str(TINY / "sft_train.jsonl"))[0] * args.repeat
    tok = load_tokenizer(str(TINY / "tokenizer.model"))
    results: dict = {
        "benchmark": "data",
        "machine": machine_info(),
        "affinity": len(os.sched_getaffinity(0)),
        "records": len(records),
        "template": args.template,
        "seq_len": args.seq_len,
        "tokenizer": "sentencepiece (data/tiny/tokenizer.model, vocab 512)",
    }
    rows = []
    for workers in args.workers:
        rate = tokenize_throughput(records, workers, args.template, args.seq_len)
        results[f"tokenize_tokens_per_s_workers_{workers}"] = rate
        rows.append((f"tokenize + template, {workers} Grain workers", rate))

    start = time.perf_counter()
    it = SFTBatchIterator(
        records,
        tok,
        seq_len=args.seq_len,
        global_batch_size=args.batch,
        template=args.template,
        seed=0,
        num_epochs=1,
    )
    build_s = time.perf_counter() - start
    total = it.stats["tokens"]
    start = time.perf_counter()
    packed = rows_seen = 0
    for batch in it:
        packed += int((batch["segment_ids"] > 0).sum())
        rows_seen += batch["inputs"].shape[0] * batch["inputs"].shape[1]
    pack_s = time.perf_counter() - start
    assert packed == total  # every token is packed exactly once (one epoch)
    results.update(
        tokens=total,
        read_tokenize_tokens_per_s=total / build_s,
        pack_tokens_per_s=total / pack_s,
        end_to_end_tokens_per_s=total / (build_s + pack_s),
        packing_efficiency=total / (rows_seen * args.seq_len),
    )
    rows += [
        ("read + validate + tokenize (iterator build)", results["read_tokenize_tokens_per_s"]),
        ("first-fit pack + batch", results["pack_tokens_per_s"]),
        ("end to end (build + pack every token)", results["end_to_end_tokens_per_s"]),
    ]
    print(
        f"{len(records)} records, {total} tokens, seq_len {args.seq_len}, "
        f"{os.cpu_count()} CPUs, packing efficiency {results['packing_efficiency']:.3f}"
    )
    print(f"{'stage':<48} {'tokens/s':>12}")
    for name, rate in rows:
        print(f"{name:<48} {rate:>12,.0f}")
    results["rows"] = [{"stage": name, "tokens_per_s": rate} for name, rate in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def markdown(data: dict) -> str:
    """This benchmark's table from its JSON."""
    table = format_table(
        data["rows"], [("stage", "stage", ""), ("tokens/s", "tokens_per_s", ",.0f")]
    )
    return (
        f"{table}\n\n{data['records']:,} records, {data['tokens']:,} tokens, template "
        f"{data['template']}, seq_len {data['seq_len']}, {data['tokenizer']}; packing "
        f"efficiency {data['packing_efficiency']:.3f}."
    )


if __name__ == "__main__":
    main()
