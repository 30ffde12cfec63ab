"""The persistent XLA compilation cache that the commands (and the quickstart) turn on."""

from __future__ import annotations

import os
from pathlib import Path


def enable_compilation_cache(min_compile_time_s: float = 1.0) -> None:
    """The persistent XLA cache in $JAXALIGN_COMPILATION_CACHE (default ~/.cache/jaxalign/xla;
    "off" disables it), for programs that took at least `min_compile_time_s` to compile."""
    import jax

    cache_dir = os.environ.get(
        "JAXALIGN_COMPILATION_CACHE", str(Path.home() / ".cache" / "jaxalign" / "xla")
    )
    if cache_dir and cache_dir != "off":
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
