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


# CI runs the suite on two xdist workers (`-n 2`; pyproject.toml's addopts hand each worker whole
# modules, `--dist loadscope`, so a module's fixtures are built once). The run ends when the
# last module does, so the slowest modules start first, in this order (by their serial seconds
# in a full `-n 2` run on a loaded 2-core machine, 3370 s in all; redo it when the suite changes
# much), then every other module in its usual order. Every worker sorts the same way, as xdist
# needs.
SLOWEST_MODULES = (
    "test_quickstart.py",  # 404 s
    "test_lora.py",  # 363
    "test_ppo_grpo.py",  # 300
    "test_multihost.py",  # 240
    "test_bench.py",  # 203
    "test_real_checkpoint.py",  # 200
    "test_moe.py",  # 161
    "test_train.py",  # 148
    "test_config_sharding.py",  # 145
    "test_rm_dpo.py",  # 138
    "test_context_parallel.py",  # 123
    "test_reliability.py",  # 114
    "test_tpu_compile.py",  # 74
    "test_lora_rl.py",  # 69
    "test_qlora_export.py",  # 65
    "test_continuous.py",  # 63
    "test_sharded_step.py",  # 62
    "test_hf_commands.py",  # 62
    "test_generate.py",  # 50
    "test_episodes.py",  # 49
    "test_data.py",  # 41
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: modules stay whole
