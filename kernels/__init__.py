"""Fused attention kernels in Triton (called through jax-triton), each with its plain-JAX reference.

One module per kernel, named as its public function (import from the module:
`from energon_jax.kernels.decode_attention import decode_attention`):
decode_attention, decode_append (a decode step's cache write and attention in one kernel, in Pallas'
Triton lowering: see its docstring for why), prefill_attention, varlen_attention. Each takes impl="auto" | "triton" |
"xla" ("auto": Triton on a GPU, the reference elsewhere) and an optional mesh, over which it
runs per device on its own heads. Nothing is imported here, so importing the package imports no
Triton.
"""

import sys as _sys

if __name__ == "kernels":
    # This folder is installed as energon_jax.kernels. Only Python started in a clone's root (pytest,
    # `python -m ...`, a notebook there) finds it as top-level `kernels`. That name is Hugging Face's
    # kernels package, which transformers >= 5.25 depends on and imports; this folder would shadow it
    # (transformers: "cannot import name 'CUDAProperties' from 'kernels'"). Load the installed package
    # in this module's place; with none installed, this one stays what `import kernels` gives.
    def _load_shadowed() -> None:
        import importlib.machinery
        import importlib.util
        import os

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in _sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        _sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
        spec.loader.exec_module(module)

    _load_shadowed()
