"""Argument checks shared by every op's public function (attention, fftconv, quant_matmul), so
that one mistake reads and raises alike whichever op it is made in.

The exception types follow CONVENTIONS.md: an argument that is not an array at all is a
TypeError; an array of a wrong dtype, and a block size that is not a positive int (or, for a
Triton tile, not a power of two; for a Mosaic (TPU) tile, not a multiple of 8), are a ValueError, the error of a well-typed argument whose
value is wrong. Each message names the argument, what was expected and what came.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

# The activation dtypes every op computes on (softmax statistics and accumulators stay float32).
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_int(x) -> bool:
    """A Python or numpy integer, not a bool (True is an Integral, and never meant as 1)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def shape_str(x) -> str:
    """An array's shape as error messages write it: ``[2, 128, 4, 64]``."""
    return "[" + ", ".join(str(n) for n in x.shape) + "]"


def check_arrays(**arrays) -> None:
    """TypeError unless each keyword's value is array-like (has a shape and a dtype)."""
    for name, x in arrays.items():
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"{name} must be an array; got {type(x).__name__}")


def check_float_dtype(name: str, x) -> None:
    """ValueError unless the array ``x`` is float32, bfloat16 or float16 (``FLOAT_DTYPES``)."""
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16; got {x.dtype}")


TPU_SUBLANES = 8  # a Mosaic block's second-to-last dim is a multiple of this (or the whole dim)


def check_block(name: str, value, *, pallas: bool = False, minimum: int = 1,
                tpu: bool = False) -> int | None:
    """A tile size or count: None, or a positive int (numpy ints too) -> None or a Python int.

    With ``pallas`` (a Triton tile: Triton's blocks are powers of two, and its dots need every
    operand dimension >= 16) it must also be a power of two >= ``minimum``. With ``tpu`` (a tile
    of rows of a Mosaic block) it must be a multiple of 8, the TPU's sublanes, and need not be a
    power of two."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be None or a positive int; got {value!r}")
    value = int(value)
    if pallas and (value < minimum or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= {minimum} for the Pallas backend "
                         f"(Triton tiles); got {value}")
    if tpu and value % TPU_SUBLANES:
        raise ValueError(f"{name} must be a multiple of {TPU_SUBLANES} for the TPU backend "
                         f"(Mosaic block rows span 8 sublanes); got {value}")
    return value
