"""Orbax checkpoints: train state (params, optimizer state, step, RNG), data-iterator state and
the resolved config, saved asynchronously and collectively by every process.

Orbax writes each step into a temporary directory and renames it when complete, so a save
interrupted by a crash is never seen by `latest_step` or `restore`. A save that fails (a full
disk, a file size limit) raises one UserError naming the step, the directory and the OS error;
the earlier complete checkpoints are left as they were.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxalign.errors import UserError
from jaxalign.paths import absolute, run_path


def os_error_text(error: BaseException) -> str:
    """The OS error behind a failed write ("No space left on device", "File too large"), from
    an OSError in the exception's chain or the `os_error_code` TensorStore puts in its message;
    else the first line of the message."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        code = re.search(r"os_error_code='?(\d+)", str(seen))
        if code:
            return os.strerror(int(code.group(1)))
        seen = seen.__cause__ or seen.__context__
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]


class _HoldOrbaxErrors(logging.Filter):
    """Holds back the tracebacks Orbax logs from its background save threads: a failed save is
    reported once, as a UserError, by the thread that waits for it."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            self.held.append(record)
            return False
        return True


def _drop_closed_event_loop_noise() -> None:
    """Silence one known, harmless report: after a failed asynchronous save, Orbax's event loop
    is closed while TensorStore still completes the save's other writes; their callbacks raise
    RuntimeError("Event loop is closed") in a TensorStore thread, which Python reports through
    `sys.unraisablehook` as a bare traceback after the run's one-line error. Every other
    unraisable exception still reaches the previous hook."""
    if getattr(sys.unraisablehook, "_jaxalign", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxalign = True
    sys.unraisablehook = hook


class Checkpointer:
    """Saves and restores {state, data, config} under RUN_DIR/checkpoints/<step>."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        _drop_closed_event_loop_noise()
        self.directory = absolute(run_path(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config", "base")
        )
        self._in_flight: int | None = None  # the step of the save not yet known to be complete
        self._failed = False
        self._held = _HoldOrbaxErrors()  # installed by the first save, removed by close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        config: dict,
        *,
        force=False,
        base: dict | None = None,
    ) -> bool:
        """Start an (asynchronous) save of `step`; returns whether a save was started. Waits for
        the previous save first; UserError if that one or this one failed. `base`: a LoRA
        run's reference to its frozen base ({"source", "hash"}), saved beside the state."""
        self.wait()
        logging.getLogger("absl").addFilter(self._held)  # once: a logger keeps a set of filters
        items = {"base": ocp.args.JsonSave(base)} if base is not None else {}
        try:
            started = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config),
                    **items,
                ),
                force=force,
            )
        except Exception as e:
            raise self._save_failed(step, e) from e
        if started:
            self._in_flight = step
        return started

    def _save_failed(self, step: int, error: BaseException) -> UserError:
        self._failed = True
        # From the directory, not Orbax's list: a step renamed into place is complete.
        complete = (
            [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]
            if self.directory.is_dir()
            else []
        )
        latest = max((s for s in complete if s != step), default=None)
        kept = (
            f"latest complete checkpoint: step {latest}"
            if latest is not None
            else "no complete checkpoint"
        )
        return UserError(
            f"{self.directory / str(step)}: saving the checkpoint of step {step} "
            f"failed ({os_error_text(error)}); earlier checkpoints are untouched "
            f"({kept})"
        )

    def restore(
        self, step: int, abstract_state: Any, base: dict | None = None
    ) -> tuple[Any, dict, dict]:
        """Restore `step` into the shardings of `abstract_state` (ShapeDtypeStructs with
        `.sharding`), which may come from a different mesh than the one that saved it. With
        `base` (a LoRA run's {"source", "hash"}), the checkpoint must have been saved on that
        base: a UserError in one line otherwise."""
        step_dir = self.directory / str(step)
        if base is not None:
            saved = self._saved_base(step_dir)
            if saved is None or saved.get("hash") != base["hash"]:
                was = "no base recorded" if saved is None else f"base {saved.get('source')}"
                raise UserError(
                    f"{step_dir}: this LoRA checkpoint was trained on another base ({was}, hash "
                    f"{(saved or {}).get('hash')}); this run's base is {base['source']} "
                    f"(hash {base['hash']})"
                )
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{self.directory / str(step)}: cannot restore checkpoint ({first[:300]})"
            ) from e
        return out["state"], out["data"], out["config"]

    @staticmethod
    def _saved_base(step_dir: Path) -> dict | None:
        """The base reference a LoRA checkpoint recorded (its `base` item), or None."""
        import json

        path = step_dir / "base" / "metadata"
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def wait(self) -> None:
        """Block until the save in flight is complete; UserError if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step if step is not None else -1, e) from e

    def _await_tmp_cleanup(self) -> None:
        """Wait for the clean-up of unfinished saves' temporary directories that Orbax (0.12)
        starts on a thread when the manager is made and only awaits in its first `save`, not in
        `close`: a run that ends before saving (a data error) would leave that thread running
        into interpreter shutdown, which then logs a 40-line traceback."""
        await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def close(self) -> None:
        """Wait for the save in flight (UserError if it failed) and release Orbax's threads.
        After a failed save, Orbax's further complaints stay held back: it was reported."""
        if self._failed:
            # Closing Orbax's event loop collects the failed save's other write tasks, which
            # asyncio would log one by one ("Task exception was never retrieved").
            logging.getLogger("asyncio").addFilter(
                lambda record: "exception was never retrieved" not in str(record.msg)
            )
            try:
                self.manager.close()
            except Exception:
                pass  # the failure this repeats was raised already
            return
        try:
            self.wait()
            self._await_tmp_cleanup()
            self.manager.close()
        finally:
            if not self._failed:
                logging.getLogger("absl").removeFilter(self._held)
                for record in self._held.held:  # errors that failed no save: shown after all
                    logging.getLogger("absl").handle(record)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract values) placed on `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A RUN_DIR, its `checkpoints/` directory, or one `checkpoints/<step>` -> that step's dir
    (the latest complete step when a run or checkpoints directory is given)."""
    p = run_path(path, key="checkpoint")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "state").is_dir():
        return p
    complete = (
        (c for c in p.iterdir() if c.name.isdigit() and (c / "state").is_dir())
        if p.is_dir()
        else ()
    )
    steps = sorted((int(c.name) for c in complete), reverse=True)
    if not steps:
        raise UserError(f"{path}: no complete checkpoint found")
    return p / str(steps[0])


def load_params(path: str | Path, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint, placed on `abstract_params`' shardings."""
    step_dir = absolute(resolve_checkpoint(path))  # Orbax wants absolute paths
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": abstract_params},
                restore_args=ocp.checkpoint_utils.construct_restore_args(
                    {"params": abstract_params}
                ),
                partial_restore=True,
            ),
        )
    except (ValueError, KeyError, FileNotFoundError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{step_dir}: cannot load parameters ({first[:300]})") from e
    return restored["params"]
