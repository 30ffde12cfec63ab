"""Specification of data sources: JSONL, Parquet, ArrayRecord, TFDS and in-memory lists read the
same records; bad records name the source, record and field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxalign.data import SFTBatchIterator, load_tokenizer, read_records, record_dataset
from jaxalign.errors import DataError

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"
RECORDS = [json.loads(line) for line in (TINY / "sft_eval.jsonl").read_text().splitlines()[:40]]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TINY / "tokenizer.model"))


def write_parquet(path: Path, records: list) -> str:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    keys = sorted({k for r in records for k in r})  # absent fields become nulls
    pq.write_table(pa.table({k: [r.get(k) for r in records] for k in keys}), str(path))
    return str(path)


def write_arrayrecord(path: Path, payloads: list[bytes]) -> str:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for payload in payloads:
        writer.write(payload)
    writer.close()
    return str(path)


def first_batches(source, tok, n=3, **kwargs):
    it = SFTBatchIterator(source, tok, seq_len=96, global_batch_size=4, shards=2, seed=1, **kwargs)
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_parquet_arrayrecord_and_memory_read_the_same_records_as_jsonl(tmp_path, tok):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    parquet = write_parquet(tmp_path / "d.parquet", RECORDS)
    arrayrecord = write_arrayrecord(
        tmp_path / "d.arrayrecord", [json.dumps(r).encode() for r in RECORDS]
    )
    for source in (parquet, arrayrecord, RECORDS):
        records, skipped = read_records(source)
        assert skipped == 0 and len(records) == 40
        for got, want in zip(records, RECORDS, strict=True):
            assert {k: v for k, v in got.items() if v is not None} == want
    reference = first_batches(str(jsonl), tok)
    for source in (parquet, arrayrecord, RECORDS):
        assert_same_batches(first_batches(source, tok), reference)
    dataset, skipped = record_dataset(arrayrecord)
    assert len(dataset) == 40 and dataset[3] == RECORDS[3]


def test_bad_records_in_binary_formats_name_source_record_and_field(tmp_path):
    good = {"prompt": "p", "completion": "c"}
    arrayrecord = write_arrayrecord(
        tmp_path / "bad.array_record",
        [
            json.dumps(good).encode(),
            b'{"prompt": "caf\xe9", "completion": "x"}',
            b"{nope",
            json.dumps({"prompt": "p", "completion": 3}).encode(),
        ],
    )
    with pytest.raises(DataError) as err:
        read_records(arrayrecord)
    assert str(err.value) == f"{arrayrecord}:record 1: invalid UTF-8 at byte 15"
    assert read_records(arrayrecord, on_error="skip") == ([good], 3)
    parquet = write_parquet(tmp_path / "bad.parquet", [good, {"prompt": "p", "completion": ""}])
    with pytest.raises(DataError) as err:
        read_records(parquet)
    assert str(err.value) == (f"{parquet}:record 1: field 'completion' must be a non-empty string")
    with pytest.raises(DataError) as err:
        read_records([good, {"messages": [{"role": "robot", "content": "x"}]}])
    assert str(err.value).startswith("<memory>[1]: field 'messages[0].role' has unknown role")
    with pytest.raises(DataError, match=r"^<memory>: no valid records \(1 bad records skipped\)"):
        read_records([{"prompt": 1}], on_error="skip")
    with pytest.raises(DataError, match=r"d\.csv: unknown data format"):
        read_records(str(tmp_path / "d.csv"))


def test_tfds_source_reads_a_locally_built_dataset(tmp_path, tok):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinySft(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"prompt": tfds.features.Text(), "completion": tfds.features.Text()}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, record in enumerate(RECORDS):
                if "prompt" in record:
                    yield i, {"prompt": record["prompt"], "completion": record["completion"]}

    builder = TinySft(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    spec = "tfds:tiny_sft:train"
    records, skipped = read_records(spec, data_dir=str(tmp_path))
    assert skipped == 0
    key = lambda r: (r["prompt"], r["completion"])  # noqa: E731
    assert sorted(map(key, records)) == sorted(key(r) for r in RECORDS if "prompt" in r)
    with pytest.raises(DataError, match=r"tfds:nope:train: cannot open TFDS dataset"):
        read_records("tfds:nope:train", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="expected tfds:NAME"):
        read_records("tfds:tiny_sft")
