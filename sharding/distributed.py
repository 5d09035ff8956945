"""Multi-host start-up: one call per process before any other JAX work, then meshes span every
process's devices (`make_mesh` uses `jax.devices()`, which is global after it).

On GPU/TPU clusters JAX finds the coordinator and process ids from the environment (SLURM, TPU
pods), so `initialize()` needs no arguments there. On CPUs (tests, a workstation) pass the
coordinator address, process count and id explicitly; `local_device_count` then emulates that
many devices per process, and cross-process collectives go through Gloo.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None) -> None:
    """Join this process to the job (`jax.distributed.initialize`) and log the global topology.

    Must run once per process, before JAX touches a device; a second call is a RuntimeError
    that says so. ``local_device_count`` (CPU only) sets how many devices this process
    emulates. Arguments left None come from the cluster's environment (SLURM, TPU pods, ...);
    where none is detected, a ValueError asks for them."""
    if _distributed_is_initialized():
        raise RuntimeError("sharding.initialize was already called in this process "
                           "(jax.distributed is initialized); call it once per process, "
                           "before any other JAX work")
    for name, value in (("num_processes", num_processes), ("local_device_count",
                                                           local_device_count)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ValueError(f"{name} must be None or an integer >= 1; got {value!r}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, num_processes={num_processes}); "
                         f"got {process_id!r}")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    except ValueError as e:
        missing = [name for name, value in (("coordinator_address", coordinator_address),
                                            ("num_processes", num_processes),
                                            ("process_id", process_id)) if value is None]
        if not missing:
            raise
        raise ValueError(
            f"sharding.initialize: no cluster environment (SLURM, a TPU pod, ...) supplied "
            f"{', '.join(missing)}; pass coordinator_address='host:port', num_processes and "
            f"process_id (and on CPU local_device_count) explicitly. JAX said: {e}") from e
    if log.isEnabledFor(logging.INFO):  # the queries start the backend: only when logged
        log.info("process %d of %d: %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _distributed_is_initialized() -> bool:
    """`jax.distributed.is_initialized()` (public since jax 0.4.x), read defensively: a jax
    without it is treated as not initialized, leaving JAX's own check to fire."""
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    return bool(is_initialized()) if is_initialized is not None else False
