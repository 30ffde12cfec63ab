"""The bad-input corpus (tests/data/bad/): each case is one line naming what is wrong and where,
no traceback without --debug, and nothing already in the run directory is lost."""

from pathlib import Path

import pytest

from jaxalign import cli

REPO = Path(__file__).resolve().parent.parent
BAD = REPO / "tests" / "data" / "bad"
SFT = str(REPO / "configs" / "sft_tiny.yaml")
QUICK = [
    "train.steps=1",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.progress=false",
    "logging.tensorboard=false",
    "train.eval_every=0",
]
SMALL = ["model.num_layers=1", "model.hidden_size=32", "model.intermediate_size=64"]

# case -> (how to use it, what the one-line error must contain)
CASES = {
    "malformed_json.jsonl": ("data", "malformed_json.jsonl:2: malformed JSON"),
    "missing_field.jsonl": ("data", "missing_field.jsonl:2: "),
    "wrong_type.jsonl": ("data", "wrong_type.jsonl:2: field 'completion'"),
    "empty_completion.jsonl": (
        "data",
        "empty_completion.jsonl:3: field 'completion' must be a non-empty string",
    ),
    "unknown_role.jsonl": (
        "data",
        "unknown_role.jsonl:1: field 'messages[1].role' has unknown role 'bot'",
    ),
    "messages_not_a_list.jsonl": ("data", "messages_not_a_list.jsonl:1: field 'messages'"),
    "not_an_object.jsonl": ("data", "not_an_object.jsonl:2: "),
    "empty.jsonl": ("data", "empty.jsonl: no valid records"),
    "invalid_utf8.jsonl": ("data", "invalid_utf8.jsonl:2: invalid UTF-8"),
    "truncated.jsonl.gz": ("data", "truncated.jsonl.gz"),
    "pref_missing_rejected.jsonl": (
        "pref",
        "pref_missing_rejected.jsonl:2: record must have a 'rejected' field",
    ),
    "pref_bad_margin.jsonl": ("pref", "pref_bad_margin.jsonl:1: field 'margin' must be a number"),
    "not_a_tokenizer.model": (
        "tokenizer",
        "not_a_tokenizer.model: not a valid SentencePiece model",
    ),
    "config_unknown_key.yaml": (
        "config",
        "unknown config key 'train.stpes' (did you mean 'train.steps'?)",
    ),
    "config_wrong_type.yaml": ("config", "train.batch_size: expected an integer, got 'eight'"),
    "config_bad_mesh.yaml": (
        "config",
        "mesh: data=3 x fsdp=1 x expert=1 x context=1 x tensor=1 needs 3 devices per slice, "
        "but 8 are available",
    ),
    "config_two_fill_axes.yaml": ("config", "at most one mesh axis may be -1"),
    "config_invalid_yaml.yaml": ("config", "config_invalid_yaml.yaml:3: invalid YAML"),
    "config_unknown_trainer.yaml": (
        "config",
        "trainer: unknown trainer 'sftt' (did you mean 'sft'?",
    ),
    "rules_unknown_axis.yaml": ("rules", "rule 'mlp' names unknown mesh axis 'model'"),
    "empty_checkpoint_dir": ("init_from", "empty_checkpoint_dir: no complete checkpoint found"),
    "partial_checkpoint": ("init_from", "partial_checkpoint: no complete checkpoint found"),
    "hf_missing_shard": ("from_hf", "model-00001-of-00002.safetensors"),
    "hf_unsupported_arch": ("from_hf", "gpt2"),
    "missing_data_file.jsonl": ("data", "missing_data_file.jsonl: data file not found"),
}


def argv_for(case: str, run_dir: Path) -> list[str]:
    kind, _ = CASES[case]
    path = BAD / case
    base = ["--set", f"run_dir={run_dir}", *[a for q in QUICK for a in ("--set", q)]]
    if kind != "from_hf":
        base += [a for q in SMALL for a in ("--set", q)]
    if kind == "config":
        return ["train", str(path), "--set", f"run_dir={run_dir}"]
    if kind == "data":
        return ["train", SFT, *base, "--set", f"data.train_file={path}"]
    if kind == "pref":
        return [
            "train",
            str(REPO / "configs" / "rm_tiny.yaml"),
            *base,
            "--set",
            "init_from=null",
            "--set",
            f"data.train_file={path}",
        ]
    if kind == "tokenizer":
        return ["train", SFT, *base, "--set", f"data.tokenizer={path}"]
    if kind == "rules":
        return ["train", SFT, *base, "--set", f"sharding.rules_file={path}"]
    if kind == "init_from":
        return ["train", SFT, *base, "--set", f"init_from={path}"]
    # from_hf takes the architecture from config.json: a config without a model section
    config = run_dir.parent / "from_hf.yaml"
    config.write_text(
        f"trainer: sft\ndata:\n  train_file: {REPO}/data/tiny/sft_train.jsonl\n"
        f"  tokenizer: {REPO}/data/tiny/tokenizer.model\n"
    )
    return ["train", str(config), *base, "--set", f"model.from_hf={path}"]


def test_corpus_has_at_least_twenty_kinds():
    assert len(CASES) >= 20
    on_disk = {p.name for p in BAD.iterdir()}
    assert {c for c in CASES if c != "missing_data_file.jsonl"} <= on_disk


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line_and_keeps_the_run_dir(case, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run_dir / "notes.txt").write_text("earlier work\n")
    code = cli.main(argv_for(case, run_dir))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("error: ") and CASES[case][1] in err, err
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert (run_dir / "notes.txt").read_text() == "earlier work\n"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="unknown config key"):
        cli.main(["--debug", *argv_for("config_unknown_key.yaml", tmp_path / "run")])


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    """init_from a run whose parameters have other shapes."""
    first = tmp_path / "small"
    assert (
        cli.main(
            [
                "train",
                SFT,
                "--set",
                f"run_dir={first}",
                *[a for q in QUICK + SMALL for a in ("--set", q)],
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = cli.main(
        [
            "train",
            SFT,
            "--set",
            f"run_dir={tmp_path / 'big'}",
            *[a for q in QUICK + SMALL for a in ("--set", q)],
            "--set",
            "model.hidden_size=64",
            "--set",
            f"init_from={first}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "cannot load parameters" in err and str(first) in err, err


def test_no_unsafe_deserialization_of_user_files():
    """Nothing in the package unpickles: user files are read as safetensors, Orbax/JSON, or YAML
    through safe_load."""
    unsafe = (
        "import pickle",
        "pickle.load",
        "cloudpickle",
        "torch.load",
        "allow_pickle=True",
        "yaml.load(",
        "yaml.unsafe_load",
        "yaml.Loader",
        "marshal.load",
        " eval(",
        "exec(",
    )
    offenders = [
        f"{p.relative_to(REPO)}: {pattern}"
        for p in (REPO / "jaxalign").rglob("*.py")
        for pattern in unsafe
        if pattern in p.read_text()
    ]
    assert offenders == []


def test_data_error_on_a_fresh_run_is_one_line_at_exit(tmp_path):
    """The checkpointer's background thread must be closed on every error path: a data error on
    a fresh run directory once ended in Orbax's 'cannot schedule new futures after interpreter
    shutdown' traceback in most tries. The race is per process: several are launched at once."""
    import subprocess
    import sys

    bad = BAD / "malformed_json.jsonl"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxalign.cli",
                "train",
                SFT,
                "--set",
                f"run_dir={tmp_path / f'run{i}'}",
                "--set",
                f"data.train_file={bad}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = [line for line in (out + err).splitlines() if line.strip()]
        assert len(lines) == 1, "\n".join(lines)
        assert "malformed_json.jsonl:2: malformed JSON" in lines[0]
