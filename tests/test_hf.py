"""Hugging Face interop: import and export are exact against transformers, for every family."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign import hf  # noqa: E402
from jaxalign import sharding as shd  # noqa: E402
from jaxalign.config import MeshConfig, ModelConfig, load_config  # noqa: E402
from jaxalign.errors import ConfigError  # noqa: E402

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "llama": dict(
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=0),
    "qwen3": dict(head_dim=16, tie_word_embeddings=True, attention_bias=True, vocab_size=320),
    "gemma": dict(head_dim=16),
}
IDS = np.random.default_rng(0).integers(1, 127, (2, 12))
TOL = 1e-4
TEXT = (
    "Hello, world! Ünïcödé façade — naïve café. 日本語のテキスト。 Привет, мир! مرحبا "
    "🙂🚀👩‍👩‍👧 \t tabs\n\n\n   spaces   \u00a0nbsp\r\n<|im_start|>user\nhi<|im_end|> end  "
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def one_device_mesh():
    return shd.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def write_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer.json trained here, with a chat template."""
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
    tok.train_from_iterator(
        [TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20], trainer
    )
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


_HF_MODELS: dict = {}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """family -> (directory, torch model): a tiny random transformers model, saved."""

    def make(family):
        if family not in _HF_MODELS:
            torch.manual_seed(0)
            cfg = transformers.AutoConfig.for_model(family, **{**TINY, **FAMILIES[family]})
            model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
            with torch.no_grad():  # every weight non-trivial: norms, biases, q/k norms
                for name, p in model.named_parameters():
                    base = 1.0 if "norm" in name and family != "gemma" else 0.0
                    p.copy_(base + 0.2 * torch.randn_like(p))
            directory = tmp_path_factory.mktemp(f"hf_{family}")
            model.save_pretrained(directory)
            if family == "qwen3":
                write_tokenizer(directory)
            _HF_MODELS[family] = (directory, model)
        return _HF_MODELS[family]

    return make


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_and_export_logits_match_transformers(family, hf_model, tmp_path):
    directory, torch_model = hf_model(family)
    model = hf.from_pretrained(directory, mesh=one_device_mesh())
    logits = np.asarray(model(IDS))
    assert logits.shape == (*IDS.shape, torch_model.config.vocab_size)
    assert np.abs(logits - torch_logits(torch_model, IDS)).max() <= TOL

    out = hf.save_pretrained(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(torch_model)
    assert np.abs(torch_logits(reloaded, IDS) - logits).max() <= TOL


def test_sharded_scanned_import_equals_one_device(hf_model, tmp_path):
    """fsdp=4 x tensor=2 on 8 devices, scan-stacked layers: same logits as one device; the
    export from that layout, in several shards, reloads with the same logits."""
    directory, torch_model = hf_model("llama")
    single = np.asarray(hf.from_pretrained(directory, mesh=one_device_mesh())(IDS))
    mesh = shd.make_mesh(MeshConfig(fsdp=4, tensor=2))
    model = hf.from_pretrained(directory, mesh=mesh, base=ModelConfig(scan_layers=True))
    wq = model.params["blocks"]["attn"]["wq"]
    assert wq.shape == (2, 32, 4, 8) and wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (2, 8, 2, 8)
    np.testing.assert_allclose(np.asarray(model(IDS)), single, atol=1e-5, rtol=0)

    out = hf.save_pretrained(model, tmp_path / "export", max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(torch_logits(reloaded, IDS) - single).max() <= TOL


def hf_config(family, **fields):
    return {"model_type": family, **TINY, **fields}


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(model_type="gpt2"), "gpt2"),
        (dict(architectures=["LlamaForTokenClassification"]), "LlamaForTokenClassification"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (
            dict(model_type="qwen2", use_sliding_window=True, max_window_layers=1),
            "max_window_layers",
        ),
        (dict(attention_dropout=0.1), "attention_dropout"),
    ],
)
def test_unsupported_config_is_an_error_naming_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        hf.model_config_from_hf(hf_config(fields.pop("model_type", "llama"), **fields))


def test_configs_written_by_transformers_4_and_5_import(tmp_path):
    """Token ids, private keys and other tools' settings are accepted; the architecture is read."""
    v5 = transformers.LlamaConfig(**TINY, unk_token_id=0, pad_token_id=2)
    v5.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and written["unk_token_id"] == 0
    cfg5 = hf.model_config_from_hf(written)
    # What transformers 4.x wrote for SmolLM2 (rope_theta and rope_scaling at the top level,
    # torch_dtype, transformers.js settings), at the tiny sizes.
    v4 = hf_config(
        "llama",
        _name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
        _model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
        torch_dtype="bfloat16",
        transformers_version="4.42.3",
        rope_theta=10000.0,
        rope_scaling=None,
        rope_interleaved=False,
        is_llama_config=True,
        unk_token_id=0,
        **{"transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16"}}},
    )
    assert hf.model_config_from_hf(v4) == cfg5
    assert (cfg5.num_layers, cfg5.num_kv_heads, cfg5.rope_theta) == (
        TINY["num_hidden_layers"],
        TINY["num_key_value_heads"],
        10000.0,
    )
    with pytest.raises(ConfigError, match="rope_interleaved"):
        hf.model_config_from_hf(hf_config("llama", rope_interleaved=True))


def test_config_mapping_per_family():
    gemma = hf.model_config_from_hf(hf_config("gemma", hidden_act="gelu"))
    assert (
        gemma.norm_plus_one,
        gemma.scale_embeddings,
        gemma.mlp_activation,
        gemma.head_dim,
        gemma.tie_embeddings,
    ) == (True, True, "gelu_tanh", 256, True)
    llama = hf.model_config_from_hf(
        hf_config(
            "llama",
            attention_bias=True,
            rope_theta=5e5,
            rope_scaling={
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
        )
    )
    assert (llama.attention_bias, llama.attention_out_bias, llama.rope_theta) == (True, True, 5e5)
    assert llama.rope_scaling["original_max_position_embeddings"] == 2048
    qwen2 = hf.model_config_from_hf(hf_config("qwen2"))
    assert (qwen2.attention_bias, qwen2.attention_out_bias, qwen2.sliding_window) == (
        True,
        False,
        None,
    )
    with pytest.raises(ConfigError, match="model.mlp_bias"):
        hf.hf_config_from_model(ModelConfig(qk_norm=True, mlp_bias=True))


def test_tokenizer_ids_and_chat_template_equal_transformers(hf_model):
    directory, _ = hf_model("qwen3")
    ours = hf.load_hf_tokenizer(directory)
    from jaxalign.data.tokenizer import load_tokenizer

    assert isinstance(load_tokenizer(str(directory)), hf.HFTokenizer)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT, add_special_tokens=False)
    assert len(ids) > 40 and ours.decode(ids) == TEXT.replace("<|im_start|>", "").replace(
        "<|im_end|>", ""
    )
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    assert (ours.eos_id, ours.pad_id, ours.bos_id) == (auto.eos_token_id, auto.pad_token_id, -1)
    messages = [{"role": "user", "content": "Grüß dich 🙂"}, {"role": "assistant", "content": "hi"}]
    assert ours.apply_chat_template(
        messages, add_generation_prompt=True
    ) == auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_from_hf_config_and_cli_export(hf_model, tmp_path):
    """`model.from_hf` sets the architecture and the initial params; `jaxalign export` of the
    run's checkpoint reloads in transformers with the same logits and the tokenizer files."""
    from toy import ToyAlgorithm

    from jaxalign import cli
    from jaxalign.checkpoint import Checkpointer
    from jaxalign.config import save_config
    from jaxalign.trainers.loop import Trainer

    directory, torch_model = hf_model("qwen3")
    sets = [
        f"model.from_hf={directory}",
        f"run_dir={tmp_path / 'run'}",
        "mesh.fsdp=1",
        "train.batch_size=2",
        "train.seq_len=12",
    ]
    cfg = load_config(None, sets)
    assert (cfg.model.vocab_size, cfg.model.head_dim, cfg.model.qk_norm) == (320, 16, True)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        load_config(None, [*sets, "model.vocab_size=64"])

    trainer = Trainer(cfg, ToyAlgorithm(cfg), devices=jax.devices()[:1])
    params = trainer.initial_params()
    expected = hf.from_pretrained(directory, mesh=trainer.mesh).params
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    ckpt = Checkpointer(run_dir / "checkpoints", keep=1, async_save=False)
    ckpt.save(3, {"step": np.int32(3), "params": params}, {}, {}, force=True)
    ckpt.close()
    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(torch_logits(reloaded, IDS) - torch_logits(torch_model, IDS)).max() <= TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode(TEXT, add_special_tokens=False) == hf.load_hf_tokenizer(out).encode(TEXT)


def test_reward_model_exports_as_sequence_classifier(tmp_path):
    """A RewardModel writes *ForSequenceClassification with a one-label score head; its score
    equals ours. A SentencePiece tokenizer exports with the same ids."""
    from flax import nnx

    from jaxalign.data.tokenizer import load_tokenizer
    from jaxalign.models.reward import RewardModel

    sp_path = str(Path(__file__).parent.parent / "data" / "tiny" / "tokenizer.model")
    sp = load_tokenizer(sp_path)
    cfg = ModelConfig(
        vocab_size=sp.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    graphdef = nnx.split(nnx.eval_shape(lambda: RewardModel(cfg, nnx.Rngs(0))))[0]
    params = jax.jit(lambda: nnx.split(RewardModel(cfg, nnx.Rngs(0)))[1].to_pure_dict())()
    rewards = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, IDS))

    out = hf.save_pretrained((cfg, params), tmp_path / "rm", tokenizer=sp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id == sp.pad_id
    assert np.abs(torch_logits(reloaded, IDS)[:, 0] - rewards).max() <= TOL

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = TEXT.replace("<|im_start|>", "<|user|>")
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


def test_cli_export_of_a_ppo_run_writes_its_policy(tmp_path):
    """A PPO checkpoint holds {policy, value}: `jaxalign export` writes the policy, and
    transformers' logits of the export equal ours of the policy's parameters."""
    from flax import nnx
    from toy import random_params, toy_config, write_run

    from jaxalign import cli
    from jaxalign.models.actor_critic import ActorCritic

    cfg = toy_config(tmp_path, trainer="ppo", **{"mesh.fsdp": 1})
    abstract = nnx.split(nnx.eval_shape(lambda: ActorCritic(cfg.model, nnx.Rngs(0))))[1]
    params = random_params(abstract, seed=4)
    assert set(params) == {"policy", "value"}
    run_dir = write_run(tmp_path / "ppo_run", cfg, params)

    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = IDS % cfg.model.vocab_size
    policy = hf.PretrainedModel(cfg.model, params["policy"], one_device_mesh())
    assert np.abs(torch_logits(reloaded, ids) - np.asarray(policy(ids))).max() <= TOL
