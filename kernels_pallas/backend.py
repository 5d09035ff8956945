"""Backend choice shared by every op: which implementation runs, and whether Pallas interprets."""

from __future__ import annotations

import jax


def resolve_backend(backend: str) -> tuple[str, bool]:
    """Map a user's backend ("auto" | "reference" | "xla" | "pallas") to (implementation, interpret).

    "auto" is the Pallas kernel on GPU and the XLA path elsewhere; "pallas" on a CPU runs the kernel
    in interpret mode (how the tests exercise kernel code). No op has a TPU (Mosaic) kernel yet."""
    platform = jax.default_backend()
    if backend == "auto":
        backend = "pallas" if platform == "gpu" else "xla"
    if backend == "pallas":
        if platform == "tpu":
            raise NotImplementedError(
                "backend='pallas' has no TPU (Mosaic) kernel yet; use backend='xla' or 'auto'")
        return "pallas", platform != "gpu"
    return backend, False
