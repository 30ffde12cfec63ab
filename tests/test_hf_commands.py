"""Every command that takes a model takes a Hugging Face model directory: `generate`,
`rejection-sample`, `eval`, `score` and `export`, with the directory's tokenizer and chat
template, equal to transformers on the same prompts."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign import cli  # noqa: E402
from jaxalign.data import load_tokenizer, render  # noqa: E402

TINY = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXT = "the quick brown fox jumps over the lazy dog. What do you get from 18 + 16? 34 "
PROMPTS = [
    {"prompt": "the quick brown fox"},
    {"messages": [{"role": "user", "content": "What do you get from 1 + 2?"}]},
]
EVAL_RECORDS = [
    {"prompt": "What do you get from 18 + 16?", "family": "arithmetic", "answer": "34"},
    {"prompt": "What do you get from 2 + 3?", "family": "arithmetic", "answer": "5"},
]


def write_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer.json trained here, with a chat template; pad differs from
    EOS, so transformers' sequence classifier scores the last token, as jaxalign does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT * 20], trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )


def save_random(model, directory) -> None:
    torch.manual_seed(0)
    with torch.no_grad():  # every weight non-trivial, so a wrong layout shows in the numbers
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(directory)
    write_tokenizer(directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{lm, rm, rm2}: a Llama causal LM, a one-label and a two-label sequence classifier, each a
    Hugging Face directory with a tokenizer and chat template (the 2-label one: config only)."""
    root = tmp_path_factory.mktemp("hf_commands")
    ids = dict(eos_token_id=2, pad_token_id=0, bos_token_id=None)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **ids)).eval()
    save_random(lm, root / "lm")
    rm_config = transformers.LlamaConfig(**TINY, **ids, num_labels=1)
    rm = transformers.LlamaForSequenceClassification(rm_config).eval()
    save_random(rm, root / "rm")
    (root / "rm2").mkdir()
    config = json.loads((root / "rm" / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    (root / "rm2" / "config.json").write_text(json.dumps(config))
    return {"lm": (root / "lm", lm), "rm": (root / "rm", rm), "rm2": (root / "rm2", None)}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def torch_rewards(rm, sequences) -> np.ndarray:
    with torch.no_grad():
        return np.asarray([float(rm(torch.tensor([list(s)])).logits[0, 0]) for s in sequences])


def test_generate_from_hf_dir_is_transformers_greedy(dirs, tmp_path):
    directory, lm = dirs["lm"]
    out = tmp_path / "out.jsonl"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    argv = ["generate", "--model", str(directory), "--input", prompts, "--output", str(out)]
    sets = ["sampling.temperature=0", "sampling.max_new_tokens=6", "--no-progress"]
    assert cli.main([*argv, *(f"--set={s}" for s in sets[:2]), sets[2]]) == 0
    rows = read_jsonl(out)
    assert len(rows) == len(PROMPTS) and all(row["completion"] for row in rows)

    auto = transformers.AutoTokenizer.from_pretrained(directory)
    ours = load_tokenizer(str(directory))
    stop = auto.convert_tokens_to_ids("<|im_end|>")
    for record, row in zip(PROMPTS, rows, strict=True):
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")  # the directory's template was used
        prompt_ids = auto.encode(text, add_special_tokens=False)
        with torch.no_grad():
            new = lm.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=0,
            )[0, len(prompt_ids) :].tolist()
        body = new[: new.index(stop)] if stop in new else new
        assert row["completion"] == ours.decode(body)
        assert row["num_tokens"] == len(new)
        assert row["finish_reason"] == ("stop" if stop in new else "length")


def test_score_with_hf_sequence_classifier_equals_transformers(dirs, tmp_path):
    directory, rm = dirs["rm"]
    records = [
        {"prompt": "the quick brown fox", "response": "jumps over the lazy dog"},
        {
            "messages": [
                {"role": "user", "content": "18 + 16?"},
                {"role": "assistant", "content": "34"},
            ]
        },
    ]
    out = tmp_path / "scores.jsonl"
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    assert cli.main(["score", "--model", str(directory), "--input", inp, "--output", str(out)]) == 0
    rows = read_jsonl(out)
    assert all("reward_normalized" not in r for r in rows)  # no saved statistics
    tokenizer, template = load_tokenizer(str(directory)), str(directory / "tokenizer_config.json")
    from jaxalign.rewards.model import record_messages

    sequences = [render(record_messages(r, "x"), tokenizer, template)[0] for r in records]
    expected = torch_rewards(rm, sequences)
    np.testing.assert_allclose([r["reward"] for r in rows], expected, atol=1e-4)
    assert np.abs(expected).min() > 1e-3  # not trivially zero


def test_rejection_sample_and_eval_on_hf_dirs(dirs, tmp_path):
    lm_dir, _ = dirs["lm"]
    rm_dir, rm = dirs["rm"]
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    argv = ["rejection-sample", "--model", str(lm_dir), "--input", prompts, "--no-progress"]
    argv += ["--reward-model", str(rm_dir), "--output-sft", str(sft), "--output-dpo", str(dpo)]
    sets = ["sampling.num_samples=4", "sampling.max_new_tokens=5", "sampling.temperature=1.0"]
    assert cli.main([*argv, *(f"--set={s}" for s in sets)]) == 0
    best = read_jsonl(sft)
    assert len(best) == len(PROMPTS)
    assert len(read_jsonl(dpo)) <= len(PROMPTS)
    # The recorded score is the HF reward model's (transformers) on the RM's own rendering.
    tokenizer, template = load_tokenizer(str(rm_dir)), str(rm_dir / "tokenizer_config.json")
    for row in best:
        convo = row.get("messages") or [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        ids = render(convo, tokenizer, template)[0]
        np.testing.assert_allclose(row["score"], torch_rewards(rm, [ids])[0], atol=1e-4)

    eval_file = write_jsonl(tmp_path / "eval.jsonl", EVAL_RECORDS)
    generations, metrics = tmp_path / "gen.jsonl", tmp_path / "m.json"
    argv = ["eval", "--model", str(lm_dir), "--eval-file", eval_file, "--max-new-tokens", "4"]
    argv += ["--reference", str(lm_dir), "--generations", str(generations)]
    assert cli.main([*argv, "--output", str(metrics)]) == 0
    first = json.loads(metrics.read_text())["metrics"]
    assert first["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)  # the policy is its reference
    assert first["pass_rate"] == 0.0 and 1 <= first["response_length"] <= 4
    assert len(read_jsonl(generations)) == len(EVAL_RECORDS)
    # Against its own answers as the baseline, every comparison is a tie: a win rate of 50%.
    argv = ["eval", "--model", str(lm_dir), "--eval-file", eval_file, "--max-new-tokens", "4"]
    argv += ["--reward-model", str(rm_dir), "--baseline", str(generations)]
    assert cli.main([*argv, "--output", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["metrics"]["rm_win_rate"] == 50.0


def test_export_re_exports_an_hf_dir_in_another_dtype(dirs, tmp_path):
    directory, lm = dirs["lm"]
    out = tmp_path / "bf16"
    argv = ["export", "--checkpoint", str(directory), "--output", str(out), "--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    theirs = dict(lm.named_parameters())
    for name, p in reloaded.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, theirs[name].to(torch.bfloat16)), name
    assert (out / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


@pytest.mark.parametrize(
    "command, model, why",
    [
        ("score", "lm", "not a reward model (LlamaForCausalLM)"),
        ("score", "rm2", "a sequence classifier with 2 labels"),
        ("generate", "rm", "a *ForSequenceClassification (a reward model), not a causal LM"),
        ("export", "lm", "is the model directory being exported"),
        ("generate", "none", "nor a Hugging Face model directory (no config.json)"),
        ("score", "none", "nor a Hugging Face model directory (no config.json)"),
    ],
)
def test_wrong_kind_of_hf_dir_is_a_one_line_error(command, model, why, dirs, tmp_path, capsys):
    directory = dirs[model][0] if model in dirs else tmp_path
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    argv = {
        "score": ["score", "--model", str(directory), "--input", inp],
        "generate": ["generate", "--model", str(directory), "--input", inp, "--output", "o"],
        "export": ["export", "--checkpoint", str(directory), "--output", str(directory)],
    }[command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(directory) in err
    assert why in err and "\n" not in err


def test_rl_reward_model_can_be_an_hf_sequence_classifier(dirs):
    """`rl.reward_model: HF_DIR` scores rollout sequences as transformers does; its tokenizer
    is the policy's when the files are the same, wherever they lie."""
    from jaxalign.errors import ConfigError
    from jaxalign.hf.model import run_config
    from jaxalign.rewards import Scorer

    lm_dir, rm_dir, rm = dirs["lm"][0], *dirs["rm"]
    sets = [f"rl.reward_model={rm_dir}", "rl.reward_functions=[]"]
    cfg = run_config(lm_dir, sets)
    scorer = Scorer.from_rl_config(cfg, load_tokenizer(cfg.data.tokenizer))
    sequences = [np.asarray([1, 5, 9, 40, 2]), np.asarray([1, 7, 2])]
    np.testing.assert_allclose(
        scorer([], ["a", "b"], [{}, {}], sequences), torch_rewards(rm, sequences), atol=1e-4
    )
    cfg.data.tokenizer = str(Path(__file__).parent.parent / "data" / "tiny" / "tokenizer.model")
    with pytest.raises(ConfigError, match="differs from data.tokenizer"):
        Scorer.from_rl_config(cfg, load_tokenizer(cfg.data.tokenizer))


def test_sequence_classifier_imports_as_reward_model_and_re_exports(dirs, tmp_path):
    from jaxalign import hf

    directory, rm = dirs["rm"]
    ids = np.random.default_rng(0).integers(3, 300, (2, 9))
    model = hf.from_pretrained(directory)
    assert model.is_reward
    np.testing.assert_allclose(np.asarray(model(ids)), torch_rewards(rm, ids), atol=1e-4)
    out = hf.save_pretrained(model, tmp_path / "rm")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_rewards(reloaded, ids), torch_rewards(rm, ids), atol=1e-5)


def test_rm_run_starts_from_an_hf_sequence_classifier(dirs, tmp_path):
    """`trainer: rm` with `model.from_hf` a one-label classifier starts from its weights (its
    rewards are transformers'); a causal LM there is a one-line error."""
    import jax
    from flax import nnx

    from jaxalign.config import load_config
    from jaxalign.errors import ConfigError
    from jaxalign.models.reward import RewardModel
    from jaxalign.trainers import get_trainer
    from jaxalign.trainers.loop import Trainer

    directory, rm = dirs["rm"]
    sets = ["trainer=rm", f"run_dir={tmp_path}", f"data.tokenizer={directory}"]
    cfg = load_config(None, [*sets, f"model.from_hf={directory}"])
    params = Trainer(cfg, get_trainer("rm")(cfg), devices=jax.devices()).initial_params()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: RewardModel(cfg.model, nnx.Rngs(0))))
    ids = np.random.default_rng(1).integers(3, 300, (2, 9))
    rewards = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids)
    np.testing.assert_allclose(np.asarray(rewards), torch_rewards(rm, ids), atol=1e-4)

    cfg = load_config(None, [*sets, f"model.from_hf={dirs['lm'][0]}"])
    with pytest.raises(ConfigError, match="not a \\*ForSequenceClassification"):
        Trainer(cfg, get_trainer("rm")(cfg), devices=jax.devices()).initial_params()
