"""jaxalign: JAX-native LLM post-training. `jaxalign.train(cfg)` runs what `jaxalign train` runs.

Progress goes to the `jaxalign` logger (the command line shows it on process 0); silence it with
`logging.getLogger("jaxalign").setLevel(logging.WARNING)`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import jaxalign.config` (or the CLI's --help) does not import JAX.
    if name == "train":
        from jaxalign.trainers import train

        return train
    raise AttributeError(f"module 'jaxalign' has no attribute {name!r}")
