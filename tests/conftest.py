"""Test setup: 8 emulated CPU devices (set before JAX is imported) so sharding tests run anywhere."""

import os
import shutil
import tempfile

# --xla_backend_optimization_level=0: the suite's time is mostly XLA:CPU compiling small programs
# that then run for milliseconds; skipping LLVM's optimizations cuts the suite's CPU time by about
# 40% (what is computed, and so every tolerance, is unchanged). --xla_cpu_multi_thread_eigen=false:
# the two pytest-xdist workers already fill the cores, and Eigen's thread pool in each only adds
# contention (8-10% less wall time measured on engine, speculative and ring-attention tests).
# --xla_cpu_use_fusion_emitters=false: XLA:CPU's MLIR fusion emitters take about 3x longer to
# compile a small program than its classic elemental emitters (a GPTQ run of a 2-layer model:
# 5.9 s of XLA compilation down to 2.3 s; the whole suite 15:26 -> 9:30 on 2 cores); both
# compute the same operations.
# These three are for runs on the CPU only (JAX_PLATFORMS=cpu, the default here): XLA dies on a
# flag its build does not know, and a lent GPU's newer jaxlib need not know XLA:CPU's.
# Subprocesses inherit the flags.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CPU_COMPILE_FLAGS = (" --xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false"
                      " --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + (_CPU_COMPILE_FLAGS if os.environ["JAX_PLATFORMS"] == "cpu"
                              else "")).strip()
# One persistent compilation cache per run, shared by the pytest-xdist workers (they inherit this
# process's environment) and by the subprocesses tests start: a program that one worker compiled
# is read back, not compiled again, by the other. It cannot change a result (the executable is
# the same). Programs that compile in under 0.2 s are not worth the write.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="jaxinfer-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must follow the XLA_FLAGS assignment)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first (each file's tests stay together, so module fixtures are built
    once): under pytest-xdist the long tests then start early and short ones fill the workers'
    gaps, rather than one worker running a long test alone at the end while the other idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_unconfigure(config):
    """The process that made the run's compilation cache (the xdist controller, or a plain pytest
    process) removes it."""
    if _RUN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def single_threaded_torch():
    """torch (the models' oracle) on one thread for a module's tests: its idle worker threads spin
    and slow XLA compilation on a 2-core machine, and the test models are too small to gain from
    intra-op parallelism. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("single_threaded_torch")``."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

