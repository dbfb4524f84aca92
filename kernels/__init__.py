"""Fused attention kernels in Triton (called through jax-triton), each with its plain-JAX reference.

One module per kernel, named as its public function (import from the module:
`from energon_jax.kernels.decode_attention import decode_attention`):
decode_attention, decode_append (a decode step's cache write and attention in one kernel, in Pallas'
Triton lowering: see its docstring for why), prefill_attention, varlen_attention. Each takes impl="auto" | "triton" |
"xla" ("auto": Triton on a GPU, the reference elsewhere) and an optional mesh, over which it
runs per device on its own heads. Nothing is imported here, so importing the package imports no
Triton.
"""
