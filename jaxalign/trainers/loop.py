"""The training loop shared by every trainer: mesh, sharded state, the jitted step, checkpoints,
preemption, metrics and progress. An algorithm only supplies a loss and its data."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import sharding as shd
from jaxalign.checkpoint import Checkpointer, abstract_with_shardings
from jaxalign.config import Config, save_config, to_dict
from jaxalign.errors import UserError
from jaxalign.memory import release_free_memory
from jaxalign.metrics import (
    MetricsWriter,
    measure_matmul_peak,
    model_flops_per_token,
    plain_metric,
)
from jaxalign.models.params import build_model, init_params
from jaxalign.optim import (
    make_optimizer,
    trained_labels,
    trained_part,
    with_trained,
)
from jaxalign.paths import run_path
from jaxalign.trainers.base import Algorithm, DataIterator
from jaxalign.trainers.lora_runs import load_init_from, lora_initial_params
from jaxalign.trainers.step import (
    combine_metrics,
    eval_metrics,
    init_state,
    make_eval_step,
    make_train_step,
)

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished (or preempted) run returns."""

    final_step: int
    history: list[dict] = field(default_factory=list)
    preempted: bool = False
    state: Any = None
    extras: Any = None  # what the algorithm's on_train_end(trainer, result) returned
    data_stats: dict | None = None  # the train data's `stats`: records, bad ones skipped, dropped


def is_main_process() -> bool:
    return jax.process_index() == 0


def batch_sharding(mesh: Mesh, rules: shd.Rules, ndim: int) -> NamedSharding:
    """[grad_accum, batch, ...]: batch over the batch axes, the rest replicated."""
    return NamedSharding(
        mesh, P(None, shd.logical_to_spec(("batch",), rules)[0], *([None] * (ndim - 2)))
    )


def _allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serializable `obj`, in process order."""
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size]))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(gathered[i, : sizes[i]]).decode()) for i in range(len(sizes))]


def global_data_state(data: DataIterator) -> dict:
    """The data state of the whole run, for the checkpoint (written by process 0 only).

    With several processes, the states of all of them are gathered and merged by the iterator's
    `merge_states`.
    """
    state = data.get_state()
    if jax.process_count() == 1:
        return state
    return data.merge_states(_allgather_json(state))


def describe_records(ids: list[str], limit: int = 10) -> str:
    """`N records: a, b, ... and M more` (the first `limit` ids), for one-line errors."""
    shown = ", ".join(ids[:limit])
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return f"{len(ids)} record{'s' if len(ids) != 1 else ''}: {shown}{more}"


def local_data_state(state: dict) -> dict:
    """This process's part of a `global_data_state`."""
    if "per_process" in state:
        states = state["per_process"]
        if len(states) != jax.process_count():
            raise UserError(
                f"the checkpoint's data state was saved by {len(states)} processes; "
                f"this data source resumes only with that many "
                f"(now {jax.process_count()})"
            )
        return states[jax.process_index()]
    return state


class Trainer:
    """Runs `algorithm` under `cfg`: the one loop for every trainer."""

    def __init__(self, cfg: Config, algorithm: Algorithm, *, devices=None):
        self.cfg = cfg
        self.algorithm = algorithm
        self.mesh = shd.make_mesh(cfg.mesh, devices)
        self.rules = shd.resolve_rules(cfg.sharding)
        shd.validate_batch(cfg.train.batch_size, cfg.train.grad_accum, self.mesh, self.rules)
        self.make_model = lambda rngs: algorithm.make_model(cfg, rngs)
        self.graphdef, self.abstract_params, self.param_shardings = build_model(
            cfg, self.mesh, self.rules, self.make_model
        )
        # 'trained'/'frozen' per parameter (None: all trained); only the trained part is
        # differentiated and has optimizer state.
        self.labels = trained_labels(cfg, self.abstract_params)
        self.lora = cfg.model.lora is not None
        self.tx, self.schedule = make_optimizer(cfg.train, self.abstract_params, labels=self.labels)
        abstract_state = jax.eval_shape(
            lambda p: init_state(p, self.tx, cfg.train.seed, self.labels), self.abstract_params
        )
        replicated = NamedSharding(self.mesh, P())
        opt_shardings = optax.tree_map_params(  # moments like their parameters
            self.tx,
            lambda v, s: v if isinstance(v, optax.MaskedNode) else s,
            abstract_state["opt_state"],
            trained_part(self.param_shardings, self.labels),
            transform_non_params=lambda _: replicated,
            is_leaf=lambda v: isinstance(v, optax.MaskedNode),
        )
        self.state_shardings = {
            "step": replicated,
            "params": self.param_shardings,
            "opt_state": opt_shardings,
            "rng": replicated,
            "first_bad_step": replicated,
            "consecutive_bad": replicated,
        }
        self.abstract_state = abstract_with_shardings(abstract_state, self.state_shardings)
        self.run_dir = run_path(cfg.run_dir)
        self.frozen = None  # set in run() from algorithm.frozen_params
        self._base_ref: dict | None = None  # LoRA: the base's source and hash (checkpoints)
        self._stop = threading.Event()
        self._batch_shardings: dict[int, NamedSharding] = {}  # ndim -> to_global's sharding

    # -- state ---------------------------------------------------------------------------------

    def initial_params(self) -> Any:
        """Parameters a fresh run starts from: the algorithm's own choice (its
        `initial_params(trainer)`, e.g. a reward model from a policy checkpoint), `init_from`'s
        checkpoint, a Hugging Face model, or a seeded init."""
        if (params := self.algorithm.initial_params(self)) is not None:
            return params
        if self.lora:
            return self._lora_initial_params()
        if self.cfg.init_from:  # a LoRA run's adapters merged into its base
            return load_init_from(
                self.cfg.init_from,
                abstract_with_shardings(self.abstract_params, self.param_shardings),
            )
        if self.cfg.model.from_hf:  # a Hugging Face model directory, streamed into shardings
            from jaxalign import hf

            return hf.load_params(
                self.cfg.model.from_hf, self.cfg.model, self.abstract_params, self.param_shardings
            )
        return init_params(self.cfg, self.param_shardings, self.cfg.train.seed, self.make_model)

    def _lora_initial_params(self) -> Any:
        return lora_initial_params(
            self.cfg,
            self.mesh,
            self.rules,
            type(self.algorithm),
            self.abstract_params,
            self.param_shardings,
            self.labels,
        )

    def _lora_trained_init(self) -> Any:
        """The trained part of a seeded init (the adapters, ...): XLA computes only those
        leaves."""
        from flax import nnx

        def init_trained(key):
            model = self.make_model(nnx.Rngs(params=key))
            return trained_part(nnx.split(model)[1].to_pure_dict(), self.labels)

        return jax.jit(init_trained, out_shardings=trained_part(self.param_shardings, self.labels))(
            jax.random.PRNGKey(self.cfg.train.seed)
        )

    def checkpoint_state(self, state: dict) -> dict:
        """What a checkpoint holds of a train state: all of it, or with LoRA only the trained
        parameters (the base is referenced by `base_reference`, not copied)."""
        if not self.lora:
            return state
        return {**state, "params": trained_part(state["params"], self.labels)}

    def fresh_state(self, params: Any | None = None) -> dict:
        """A new train state from `params` (default: `initial_params()`)."""
        if params is None:
            params = self.initial_params()
        else:
            params = jax.device_put(params, self.param_shardings)
        init = jax.jit(
            lambda p: init_state(p, self.tx, self.cfg.train.seed, self.labels),
            out_shardings=self.state_shardings,
        )
        return init(params)

    def to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble the global batch from each process's local rows."""
        out = {}
        for key, value in local.items():
            value = np.asarray(value)
            sharding = self._batch_shardings.get(value.ndim)
            if sharding is None:  # built once per rank: this runs for every batch
                sharding = self._batch_shardings[value.ndim] = batch_sharding(
                    self.mesh, self.rules, value.ndim
                )
            global_shape = (value.shape[0], value.shape[1] * jax.process_count(), *value.shape[2:])
            out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
        return out

    # -- the loop ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to save and stop after the current step (what SIGTERM does)."""
        self._stop.set()

    @contextlib.contextmanager
    def _sigterm_saves(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _should_stop(self) -> bool:
        flag = self._stop.is_set()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
        return flag

    def _peak_flops(self) -> float:
        per_device = self.cfg.train.peak_flops_per_device
        if per_device > 0:
            return per_device * self.mesh.size
        measured = measure_matmul_peak()
        # Simulated CPU devices share the host's cores: one matmul already uses all of them.
        return measured if jax.devices()[0].platform == "cpu" else measured * self.mesh.size

    def run(self, init_params: Any | None = None) -> RunResult:
        """Train to `train.steps`, resuming from RUN_DIR's latest checkpoint when asked or found."""
        cfg = self.cfg
        self._preflight()
        ckpt = Checkpointer(
            self.run_dir / "checkpoints",
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
        )
        try:  # closed on every path: its background thread must not outlive an error
            return self._run(ckpt, init_params)
        finally:
            ckpt.close()

    def _run(self, ckpt: Checkpointer, init_params: Any | None) -> RunResult:
        cfg = self.cfg
        data = self.algorithm.train_data(jax.process_index(), jax.process_count())
        latest = ckpt.latest_step()
        if cfg.resume is True and latest is None:
            raise UserError(f"{self.run_dir}: resume=true but there is no checkpoint to resume")
        if latest is not None and cfg.resume is False:
            raise UserError(
                f"{self.run_dir}: has checkpoints (latest step {latest}) and resume=false; "
                "use another run_dir or resume"
            )
        needs_initial = self.algorithm.frozen_from_initial or self.lora  # LoRA: the base
        start_params = None
        if latest is None or needs_initial:
            start_params = init_params if init_params is not None else self.initial_params()
        self.frozen = self.algorithm.frozen_params(self, start_params)
        if self.lora:
            from jaxalign.models.lora import base_reference

            self._base_ref = base_reference(cfg)
        if latest is not None:
            state, data_state, _ = ckpt.restore(
                latest, self.checkpoint_state(self.abstract_state), base=self._base_ref
            )
            if self.lora:  # the adapters (and trained extras) onto the base
                params = with_trained(start_params, state["params"])
                state = {**state, "params": jax.device_put(params, self.param_shardings)}
            data.set_state(local_data_state(data_state))
            self._log(f"resumed from {self.run_dir / 'checkpoints' / str(latest)}")
        else:
            state = self.fresh_state(start_params)
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        writer = MetricsWriter(
            self.run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project,
            config=to_dict(cfg),
        )
        try:
            with self._sigterm_saves(), shd.activation_sharding(self.mesh, self.rules):
                result = self._loop(state, data, ckpt, writer)
                if not result.preempted:
                    result.extras = self.algorithm.on_train_end(self, result)
                # Skipped, dropped and truncated counts again at the end, where they are seen.
                result.data_stats = data.stats
                if (report := data.report()) is not None:
                    self._log(f"end of training: {report}")
        finally:
            writer.close()
        return result

    def _preflight(self) -> None:
        """Fail before compiling if RUN_DIR cannot be written."""
        if not is_main_process():
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"{self.run_dir}: run directory is not writable ({e.strerror or type(e).__name__})"
            ) from None

    def compile_step(self, batch: dict) -> Any:
        step = make_train_step(
            self.graphdef, self.algorithm.loss_fn, self.tx, self.schedule, self.labels
        )
        batch_shardings = {
            k: batch_sharding(self.mesh, self.rules, v.ndim) for k, v in batch.items()
        }
        frozen_shardings = jax.tree.map(lambda x: x.sharding, self.frozen)
        return jax.jit(
            step,
            in_shardings=(self.state_shardings, batch_shardings, frozen_shardings),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )

    def _loop(self, state, data, ckpt: Checkpointer, writer: MetricsWriter) -> RunResult:
        cfg, train = self.cfg, self.cfg.train
        start = int(jax.device_get(state["step"]))
        total = train.steps
        tokens_per_step = train.batch_size * train.seq_len
        interval_tokens = 0
        flops_per_token = model_flops_per_token(cfg.model, train.seq_len)
        peak = self._peak_flops()
        history: list[dict] = []
        progress = None
        if is_main_process() and train.progress:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        # One compiled step per batch shape: RL rollouts trim their rows to a few widths
        # (rl.response_buckets); every other trainer's batches have one shape.
        step_fns: dict = {}
        eval_fn = None
        interval_start = time.perf_counter()
        interval_steps = 0
        data_wait = 0.0
        preempted = False
        done = start
        compile_s = None
        # Steps since the last finiteness check -> the ids of their batches' records (host-side).
        recent_ids: dict[int, list[str]] = {}
        data.start(self)  # on-policy data (RL rollouts) builds its engine on this mesh
        for done in range(start + 1, total + 1):
            t0 = time.perf_counter()
            data.observe_state(state)  # on-policy data (RL rollouts) reads the params
            local = next(data)
            recent_ids[done] = data.record_ids()
            data_wait += time.perf_counter() - t0
            batch = self.to_global(local)
            shape_key = tuple((k, v.shape, v.dtype) for k, v in sorted(batch.items()))
            step_fn = step_fns.get(shape_key)
            if step_fn is None:
                t_compile = time.perf_counter()
                step_fn = self.compile_step(batch).lower(state, batch, self.frozen).compile()
                step_fns[shape_key] = step_fn
                compile_s = (compile_s or 0.0) + time.perf_counter() - t_compile
                interval_start += time.perf_counter() - t_compile
            state, metrics = step_fn(state, batch, self.frozen)
            interval_steps += 1
            local_tokens = self.algorithm.batch_tokens(local)
            interval_tokens += (
                tokens_per_step if local_tokens is None else local_tokens * jax.process_count()
            )
            is_last = done == total
            record: dict[str, float] = {}
            if done % train.log_every == 0 or is_last or done == start + 1:
                metrics = jax.device_get(metrics)
                elapsed = max(time.perf_counter() - interval_start, 1e-9)
                tokens_per_s = interval_tokens / elapsed
                record = {k: plain_metric(v) for k, v in metrics.items()}
                record.update(
                    tokens_per_s=tokens_per_s,
                    mfu=tokens_per_s * flops_per_token / peak,
                    step_time_s=elapsed / interval_steps,
                    data_wait_s=data_wait / interval_steps,
                )
                if compile_s is not None:
                    record["compile_s"] = compile_s
                    compile_s = None
                self._check_finite(state, ckpt, recent_ids)
                record.update(data.pop_metrics())  # e.g. rollout statistics and phase times
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if train.eval_every and (done % train.eval_every == 0 or is_last):
                t_eval = time.perf_counter()
                eval_fn = eval_fn or jax.jit(make_eval_step(self.graphdef, self.algorithm.loss_fn))
                record.update(self._evaluate(eval_fn, state["params"]))
                interval_start += time.perf_counter() - t_eval  # not part of the train speed
            if record:
                history.append({"step": done, **record})
                writer.write(done, record)
                if "loss" in record:
                    interval_start, interval_steps, data_wait = time.perf_counter(), 0, 0.0
                    interval_tokens = 0
            if progress is not None:
                progress.update(1)
            stop = self._should_stop()
            saving = (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or is_last or stop
            if saving:
                self._check_finite(state, ckpt, recent_ids)  # never save past a halting fault
                ckpt.save(
                    done,
                    self.checkpoint_state(state),
                    global_data_state(data),
                    to_dict(cfg),
                    force=True,
                    base=self._base_ref,
                )
            if train.release_memory and (saving or any(k.startswith("eval/") for k in record)):
                release_free_memory()  # see jaxalign/memory.py
            if stop and not is_last:
                preempted = True
                ckpt.wait()
                self._log(f"stop requested: saved step {done} to {ckpt.directory}; exiting")
                break
        if progress is not None:
            progress.close()
        ckpt.wait()
        return RunResult(final_step=done, history=history, preempted=preempted, state=state)

    def _check_finite(self, state, ckpt: Checkpointer, recent_ids: dict[int, list[str]]) -> None:
        """Apply train.nan_policy: halt on the first non-finite step, or after too many in a
        row with "skip". Non-finite updates were never applied (see trainers/step.py).

        `recent_ids` maps the steps since the last check to their batches' record ids; the
        halt message names those of the step at fault. Emptied when the run goes on.
        """
        step, first_bad, consecutive = (
            int(x)
            for x in jax.device_get(
                (state["step"], state["first_bad_step"], state["consecutive_bad"])
            )
        )
        train = self.cfg.train
        halt = first_bad != 0 and (
            train.nan_policy == "halt" or consecutive > train.max_consecutive_skips
        )
        if not halt:
            recent_ids.clear()
            return
        latest = ckpt.latest_step()
        kept = f"last good checkpoint: step {latest}" if latest else "no checkpoint yet"
        if train.nan_policy == "halt":
            message = f"step {first_bad}: loss or gradients became NaN/Inf; halting"
            at = first_bad
        else:
            message = (
                f"step {step}: {consecutive} non-finite steps in a row (max "
                f"{train.max_consecutive_skips}); halting"
            )
            at = step
        message += f" ({kept}, {ckpt.directory})"
        ids = recent_ids.get(at)
        if jax.process_count() > 1:  # every process halts here: name every process's records
            gathered = _allgather_json(ids)
            ids = None if any(g is None for g in gathered) else [i for g in gathered for i in g]
        if ids is not None:
            message += f"; step {at}'s batch had {describe_records(ids)}"
        raise UserError(message)

    def _evaluate(self, eval_fn, params) -> dict[str, float]:
        batches = self.algorithm.eval_data(jax.process_index(), jax.process_count())
        if batches is None:
            return {}
        totals: dict[str, float] = {}
        for local in batches:
            out = jax.device_get(eval_fn(params, self.to_global(local), self.frozen))
            out = {k: float(v) if np.ndim(v) == 0 else np.asarray(v, float) for k, v in out.items()}
            totals = combine_metrics(totals, out) if totals else out
        return {f"eval/{k}": plain_metric(v) for k, v in eval_metrics(totals).items()}

    def _log(self, message: str) -> None:
        logger.info("%s", message)
