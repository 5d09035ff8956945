"""Multi-host: two processes of 4 CPU devices, joined by `sharding.initialize`, train on one
8-device mesh and get the losses of one process with 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import sharding
from tests.sharding.multihost_worker import fsdp_losses
from tests.sharding.test_sharded_llama import LOSS_RTOL

ROOT = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_job(count: int) -> dict:
    """Start `count` worker processes on a fresh port; the JSON line process 0 prints."""
    port = _free_port()
    # devices come from the worker (sharding.initialize); the suite's other XLA flags stay
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.multihost_worker", str(port),
                               str(i), str(count)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(count)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return json.loads(outs[0].strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_process_of_eight():
    two = _run_job(2)
    assert jax.process_count() == 1 and jax.device_count() == 8  # this process is the reference
    one = fsdp_losses()
    assert two["processes"] == 2 and two["devices"] == 8
    np.testing.assert_allclose(two["losses"], one, rtol=LOSS_RTOL)
    assert two["losses"][-1] < two["losses"][0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=0), "num_processes must be"),
    (dict(num_processes=2, process_id=2), "process_id must be in"),
    (dict(local_device_count=1.5), "local_device_count must be"),
])
def test_initialize_rejects_bad_arguments_before_touching_jax(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sharding.initialize("localhost:1", **kwargs)


_INITIALIZE_TWICE = """
import sharding
try:
    sharding.initialize()
except ValueError as e:
    print("no arguments:", e)
sharding.initialize("localhost:{port}", 1, 0, local_device_count=2)
try:
    sharding.initialize("localhost:{port}", 1, 0, local_device_count=2)
except RuntimeError as e:
    print("twice:", e)
"""


def test_initialize_without_a_cluster_or_twice_says_what_to_do():
    """In a fresh process (initialize is once per process): with no arguments and no cluster
    the error names the missing arguments; a second call says it was already called, not that
    JAX was touched first."""
    env = {k: v for k, v in os.environ.items()
           if k != "XLA_FLAGS" and not k.startswith(("SLURM", "JAX_COORDINATOR", "OMPI_"))}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", _INITIALIZE_TWICE.format(port=_free_port())],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no arguments: sharding.initialize: no cluster environment" in done.stdout
    assert "pass coordinator_address='host:port', num_processes and process_id" in done.stdout
    assert "twice: sharding.initialize was already called in this process" in done.stdout
