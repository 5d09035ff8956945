"""Test setup: 8 emulated CPU devices (set before JAX is imported) so sharding tests run anywhere."""

import os

# --xla_backend_optimization_level=0: the suite's time is mostly XLA:CPU compiling small programs
# that then run for milliseconds; skipping LLVM's optimizations cuts the suite's CPU time by about
# 40% (what is computed, and so every tolerance, is unchanged). Subprocesses inherit the flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the XLA_FLAGS assignment)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first (each file's tests stay together, so module fixtures are built
    once): under pytest-xdist the long tests then start early and short ones fill the workers'
    gaps, rather than one worker running a long test alone at the end while the other idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
