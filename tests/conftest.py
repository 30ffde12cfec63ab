"""Test set-up: 8 simulated CPU devices, set before JAX initializes, and one persistent XLA
compilation cache for the whole run."""

import atexit
import os
import shutil
import tempfile

# The tests' programs are tiny and compiled once or twice each, so compilation is most of the
# suite's time: LLVM at -O0 compiles them about a quarter faster (XLA's own optimizations and
# fusions are the same; only LLVM's machine-code optimization is skipped). Commands run outside
# the tests, benchmarks and `jaxalign quickstart` keep XLA's defaults.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The two xdist workers and the commands that tests launch compile many of the same programs (a
# module's fixtures are built on each worker that runs its tests; the quickstart's stages). They
# share one cache (the commands' own, `jaxalign.cli._enable_compilation_cache`; the two-process
# tests turn it off), a new directory per run so that a run here costs what it costs on a clean
# CI machine, made by the first process to load this file and inherited through the environment.
if "JAXALIGN_COMPILATION_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxalign-test-xla-")
    os.environ["JAXALIGN_COMPILATION_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

from jaxalign.cli import _enable_compilation_cache  # noqa: E402

jax.config.update("jax_enable_x64", False)
_enable_compilation_cache(min_compile_time_s=0.3)
