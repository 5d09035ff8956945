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

    Must run before JAX touches a device. ``local_device_count`` (CPU only) sets how many devices
    this process emulates."""
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
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    log.info("process %d of %d: %d local of %d devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
