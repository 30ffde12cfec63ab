"""Orbax checkpoints: train state (params, optimizer state, step, RNG), data-iterator state and
the resolved config, saved asynchronously and collectively by every process.

Orbax writes each step into a temporary directory and renames it when complete, so a save
interrupted by a crash is never seen by `latest_step` or `restore`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxalign.errors import UserError


class Checkpointer:
    """Saves and restores {state, data, config} under RUN_DIR/checkpoints/<step>."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict, *, force=False) -> bool:
        """Start an (asynchronous) save of `step`; returns whether a save was started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore `step` into the shardings of `abstract_state` (ShapeDtypeStructs with
        `.sharding`), which may come from a different mesh than the one that saved it."""
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or abstract values) placed on `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """A RUN_DIR, its `checkpoints/` directory, or one `checkpoints/<step>` -> that step's dir
    (the latest complete step when a run or checkpoints directory is given)."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "state").is_dir():
        return p
    complete = (c for c in p.iterdir() if c.name.isdigit() and (c / "state").is_dir()) \
        if p.is_dir() else ()
    steps = sorted((int(c.name) for c in complete), reverse=True)
    if not steps:
        raise UserError(f"{path}: no complete checkpoint found")
    return p / str(steps[0])


def load_params(path: str | Path, abstract_params: Any) -> Any:
    """Only the parameters of a checkpoint, placed on `abstract_params`' shardings."""
    step_dir = resolve_checkpoint(path).absolute()  # Orbax wants absolute paths
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
