"""Backend choice shared by every op: which implementation runs, whether Pallas interprets, and
the Triton launch settings of the GPU kernels."""

from __future__ import annotations

import jax


def resolve_backend(backend: str, *, tpu_kernel: bool = False,
                    op: str = "this op") -> tuple[str, bool]:
    """Map a user's backend to (implementation, interpret).

    ``backend`` is "auto" | "reference" | "xla" | "pallas", or "pallas_tpu" for an op with a TPU
    kernel (``tpu_kernel``). "auto" is the Pallas kernel on GPU (and on TPU where the op has one)
    and the XLA path elsewhere. "pallas" is the platform's kernel: Triton on GPU, Mosaic on TPU, and
    on a CPU the Triton kernel in interpret mode (how the tests exercise kernel code). "pallas_tpu"
    forces the Mosaic kernel, interpreted off a TPU, so CPU tests reach it too. "pallas_mgpu" (ops
    with a Mosaic GPU kernel, for Hopper) runs it compiled on a GPU and in GPU interpret mode
    elsewhere; "auto" never picks it (until a GPU measurement shows it faster than Triton).
    ``op`` names the calling op in the ValueError that "pallas" on a TPU raises without
    ``tpu_kernel``."""
    platform = jax.default_backend()
    if backend == "auto":
        backend = "pallas" if platform == "gpu" or (platform == "tpu" and tpu_kernel) else "xla"
    if backend == "pallas":
        if platform == "tpu":
            if not tpu_kernel:
                raise ValueError(
                    f"backend='pallas' on a TPU needs a TPU (Mosaic) kernel, which {op} does not "
                    f"have yet; use backend='xla' or 'auto'")
            return "pallas_tpu", False
        return "pallas", platform != "gpu"
    if backend == "pallas_tpu":
        return "pallas_tpu", platform != "tpu"
    if backend == "pallas_mgpu":
        return "pallas_mgpu", platform != "gpu"
    return backend, False


def triton_compiler_params(num_warps: int, num_stages: int, interpret: bool):
    """A Triton kernel's launch settings, or None when it runs interpreted.

    One place for every op's Triton kernels: passing ``pltriton.CompilerParams`` is also what
    selects the Triton lowering (the default GPU lowering is Mosaic GPU), and that import is
    deprecated from jax 0.11, so it has one spot to change."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton  # GPU only; deprecated from jax 0.11
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
