"""`matmul(x, w)`: the dense layers' x @ w, with a hand-written backward that XLA:CPU runs faster, and
`dot`: the matmul every layer uses, accumulating low-precision operands in f32.

Same values and gradients as plain `x @ w`. Autodiff's weight gradient contracts the batch and
time axes of 3-D operands, which XLA:CPU runs about 2x slower than the same contraction written
as one 2-D matmul over the flattened leading axes (small PRM train step on CPU: 4.5 s -> 3.1 s).
The model (qwen2.py `Dense`) only picks it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def dot(spec: str, a: Array, b: Array) -> Array:
    """einsum(spec, a, b) in the operands' dtype. On CPU a bf16 product is asked for in f32 and cast
    back (one rounding either way): XLA:CPU hands only that form to its AMX kernels, 2.5-6x faster
    than the bf16-result form, which it runs as an f32 matmul on converted operands
    (experiments/notes/2026-12-06-bf16-on-cpu.md). Elsewhere the plain form (GPU GEMMs accumulate
    bf16 in f32 already)."""
    if a.dtype == jnp.float32 or jax.default_backend() != "cpu":
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(jnp.result_type(a, b))


@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
    """x [..., d_in] @ w [d_in, d_out]."""
    return _matmul_fwd(x, w)[0]


def _matmul_fwd(x, w):
    return dot("...i,io->...o", x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    # the weight gradient as one 2-D matmul
    dw = dot("ni,no->io", x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
    return dot("...o,io->...i", dy, w), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
