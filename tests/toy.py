"""A tiny in-memory algorithm for engine tests: SFT loss on synthetic token rows."""

from __future__ import annotations

import numpy as np

from jaxalign.config import Config, load_config
from jaxalign.losses import token_cross_entropy_sum
from jaxalign.trainers.base import Algorithm, DataIterator

TINY_MODEL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
}


def toy_config(tmp_path, **overrides) -> Config:
    """A tiny config; `overrides` are dotted keys, e.g. {'mesh.fsdp': 4}."""
    sets = [
        f"{k}={v}"
        for k, v in {
            "run_dir": str(tmp_path / "run"),
            "train.steps": 5,
            "train.batch_size": 8,
            "train.seq_len": 16,
            "train.lr": 3e-3,
            "train.warmup_steps": 1,
            "train.log_every": 1,
            "train.progress": False,
            "train.peak_flops_per_device": 1e9,
            "checkpoint.every": 0,
            "logging.tensorboard": False,
            **overrides,
        }.items()
    ]
    base = {"model": dict(TINY_MODEL)}
    return load_config(None, sets, base=base)


class ToyData(DataIterator):
    """Deterministic rows of counting sequences (learnable), resumable by index."""

    def __init__(self, cfg: Config, process_index: int = 0, process_count: int = 1, seed=0):
        t = cfg.train
        self.accum = t.grad_accum
        self.rows = t.batch_size // t.grad_accum // process_count
        self.seq_len = t.seq_len
        self.vocab = cfg.model.vocab_size
        self.offset = process_index * self.rows
        self.micro_rows = t.batch_size // t.grad_accum  # global rows per micro-batch
        self.seed = seed
        self.index = 0
        self.on_batch = None  # test hook: called with the batch index before returning it
        self.poison = set()  # batch indices whose loss is multiplied by NaN

    def _row(self, global_row: int):
        rng = np.random.default_rng([self.seed, global_row])
        start, stride = rng.integers(0, self.vocab), rng.integers(1, 4)
        seq = (start + stride * np.arange(self.seq_len + 1)) % self.vocab
        return seq.astype(np.int32)

    def __next__(self):
        if self.on_batch is not None:
            self.on_batch(self.index)
        total_rows = self.rows * self.accum
        rows = []
        for a in range(self.accum):
            for r in range(self.rows):
                global_row = self.index * 10_000 + a * self.micro_rows + self.offset + r
                rows.append(self._row(global_row))
        weight = np.full(
            (self.accum, self.rows), np.nan if self.index in self.poison else 1.0, np.float32
        )
        self.index += 1
        seqs = np.stack(rows).reshape(self.accum, total_rows // self.accum, self.seq_len + 1)
        t = self.seq_len
        return {
            "inputs": seqs[..., :-1],
            "targets": seqs[..., 1:],
            "loss_mask": np.ones(seqs[..., 1:].shape, np.float32),
            "segment_ids": np.ones((self.accum, self.rows, t), np.int32),
            "positions": np.broadcast_to(
                np.arange(t, dtype=np.int32), (self.accum, self.rows, t)
            ).copy(),
            "weight": weight,
        }

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = int(state["index"])


class ToyAlgorithm(Algorithm):
    """SFT loss over ToyData."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.data = None
        self.poison = set()

    def loss_fn(self, model, batch, rng, frozen=None):
        hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        loss_sum, n = token_cross_entropy_sum(
            hidden,
            model.output_weight(),
            batch["targets"],
            batch["loss_mask"],
            chunks=self.cfg.loss.vocab_chunks,
        )
        return loss_sum * batch["weight"].mean(), n, {}

    def train_data(self, process_index, process_count):
        self.data = ToyData(self.cfg, process_index, process_count)
        self.data.poison = self.poison
        return self.data

    def eval_data(self, process_index, process_count):
        return None


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


def run_toy(cfg: Config, devices=None, hook=None):
    """Train ToyAlgorithm under `cfg`; `hook(batch_index)` runs before each training batch (e.g.
    raises to simulate a crash). Returns (trainer, result)."""
    from jaxalign.trainers.loop import Trainer

    algo = ToyAlgorithm(cfg)
    trainer = Trainer(cfg, algo, devices=devices)
    if hook is not None:
        original = algo.train_data

        def with_hook(*a):
            data = original(*a)
            data.on_batch = hook
            return data

        algo.train_data = with_hook
    return trainer, trainer.run()


def random_params(abstract_state, seed: int, std: float = 0.25) -> dict:
    """NumPy parameters for an abstract NNX state (much faster than NNX's eager init): norms 1,
    everything else normal(0, std); a larger std than the default init makes the distributions
    peaked, so greedy decoding never ties."""
    import jax

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            np.ones(x.shape, np.float32)
            if "norm" in jax.tree_util.keystr(path)
            else (std * rng.standard_normal(x.shape)).astype(np.float32)
        ),
        abstract_state.to_pure_dict(),
    )


def write_run(path, cfg: Config, params, step: int = 1):
    """A run directory as the trainers write it: config.yaml and one checkpoint of `params`."""
    from jaxalign.checkpoint import Checkpointer
    from jaxalign.config import save_config, to_dict

    ckpt = Checkpointer(path / "checkpoints", keep=1, async_save=False)
    ckpt.save(step, {"params": params}, {}, to_dict(cfg), force=True)
    ckpt.close()
    save_config(cfg, path / "config.yaml")
    return path


def reward_model_run(path, cfg: Config, seed: int = 3):
    """A reward-model run directory (`cfg.trainer` rm) with random weights."""
    from flax import nnx

    from jaxalign.models.reward import RewardModel

    abstract = nnx.split(nnx.eval_shape(lambda: RewardModel(cfg.model, nnx.Rngs(0))))[1]
    return write_run(path, cfg, random_params(abstract, seed))


def train_steps(cfg: Config, devices=None):
    """(final state, per-step metrics) of `cfg.train.steps` steps of the trainer's compiled step
    on ToyData (this process's rows), as `Trainer` runs it (shardings, activation rules,
    donation) without its checkpointing and logging."""
    import jax

    from jaxalign import sharding as shd
    from jaxalign.trainers.loop import Trainer

    trainer = Trainer(cfg, ToyAlgorithm(cfg), devices=devices)
    state = trainer.fresh_state()
    data = trainer.algorithm.train_data(jax.process_index(), jax.process_count())
    history, step = [], None
    with shd.activation_sharding(trainer.mesh, trainer.rules):
        for _ in range(cfg.train.steps):
            batch = trainer.to_global(next(data))
            step = step or trainer.compile_step(batch)
            state, metrics = step(state, batch, trainer.frozen)
            history.append(jax.device_get(metrics))
    return state, history
