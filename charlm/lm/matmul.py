"""Matrix products in a chosen operand precision, with gradients whose operands are row-major.

Every matmul of the model goes through here. With `dtype` bfloat16 the operands are rounded to
it and the products accumulate in float32 (mixed-precision training, Micikevicius et al. 2018;
Kalamkar et al. 2019 for bfloat16); with None they are plain products in the inputs' type.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

# The operand type of every matmul; None keeps the parameters' own (float32, or float64 in tests).
PRECISIONS = {"float32": None, "bfloat16": jnp.bfloat16}


def dot(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """a @ b; with `dtype` (bfloat16) the operands are rounded to it and the product is
    accumulated in float32, otherwise it is the plain product in the inputs' type."""
    if dtype is None:
        return jnp.dot(a, b)
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def transposed(x: jax.Array) -> jax.Array:
    """The transpose of a matrix, written out row-major. XLA folds a plain transpose into the
    dot that consumes it, and on CPU runs that transposed product 1.2× (float32) to 2.5×
    (bfloat16, which it then computes in float32) slower than x @ w; a transpose taken through
    a 3-D view is not folded."""
    rows, columns = x.shape
    return jnp.swapaxes(x[..., None], 0, 2).reshape(columns, rows)


def weight_gradient(x: jax.Array, d_y: jax.Array, dtype: Any) -> jax.Array:
    """∂W of y = x W: xᵀ d_y summed over every leading axis of x and d_y, as one matmul."""
    x, d_y = x.reshape(-1, x.shape[-1]), d_y.reshape(-1, d_y.shape[-1])
    return dot(transposed(x), d_y, dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w over the last axis of x, with operands in `dtype` (see `dot`) in the forward and
    the backward products alike (mixed-precision training, Micikevicius et al. 2018; Kalamkar
    et al. 2019 for bfloat16). The gradient is hand-written so that its two products,
    d_y Wᵀ and xᵀ d_y, take row-major operands (`transposed`)."""
    return dot(x, w, dtype)


def _matmul_fwd(x, w, dtype):
    return dot(x, w, dtype), (x, w)


def _matmul_bwd(dtype, residuals, d_y):
    x, w = residuals
    d_x = dot(d_y, transposed(w), dtype)
    return d_x.astype(x.dtype), weight_gradient(x, d_y, dtype).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def rounded(w: jax.Array, dtype: Any) -> jax.Array:
    """w in `dtype` when one is given: a weight used in every step is rounded once, outside."""
    return w if dtype is None else w.astype(dtype)
