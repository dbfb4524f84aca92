"""The Pallas kernels lower for a CUDA GPU on this CPU machine, and their Triton modules pass
MLIR's verifier: a kernel that only ever ran under the interpreter can still fail to compile on the
GPU (an i1 loop bound did, in sample_filter's first version). The GPU itself is not needed for this."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax._src.pallas.triton import lowering as triton_lowering

from energon_jax.kernels import decode_append, sample_filter

_UNCHECKED = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


@pytest.fixture
def verified(monkeypatch):
    """Every Triton module lowered in the test is run through MLIR's verifier; counts them."""
    lowered = []
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises MLIRError naming the op and source line
        lowered.append(result)
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    return lowered


def _export_for_cuda(fn, *args):
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=_UNCHECKED)(*args)


@pytest.mark.parametrize("bits,block,stages", [(1, 1024, 1), (2, 1024, 3), (4, 512, 2), (2, 4096, 2), (2, 2048, 2)])
def test_sample_filter_lowers_for_cuda(verified, bits, block, stages):
    x, k, p = jnp.zeros((4, 3001)), jnp.zeros((4,), jnp.int32), jnp.ones((4,))
    fn = functools.partial(sample_filter._thresholds_pallas, bits=bits, block=block, num_warps=4,
                           num_stages=stages, interpret=False)
    _export_for_cuda(fn, x, k, p)
    assert len(verified) == 1


@pytest.mark.parametrize("dtype,splits", [(jnp.bfloat16, 1), (jnp.bfloat16, 3), (jnp.float32, 1)])
def test_decode_append_lowers_for_cuda(verified, dtype, splits):
    b, n, s, d = 2, 4, 64, 32
    qkv, cache = jnp.zeros((b, 3, n, d), dtype), jnp.zeros((b, n, s, d), dtype)
    fn = functools.partial(decode_append._decode_append_pallas, scale=0.125, block_s=16, splits=splits, num_warps=4,
                           num_stages=3, interpret=False)
    _export_for_cuda(fn, qkv, cache, cache, jnp.zeros((b,), jnp.int32))
    assert len(verified) == 1
