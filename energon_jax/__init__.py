"""energon-jax: serve Bert- and GPT-style models sharded over a JAX device mesh.

The public names are imported on first use (PEP 562), so `import energon_jax` (and the `energon`
command's start) does not import jax until one is asked for. The command installs its Ctrl-C
handler before jax registers its gc callback, where an interrupt would be dropped (cli.run).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> (module, attribute)
_EXPORTS = {
    "BertConfig": ("energon_jax.models.bert", "BertConfig"),
    "BertModel": ("energon_jax.engine.bert", "BertModel"),
    "EncodeStats": ("energon_jax.engine.bert", "EncodeStats"),
    "GPT2Config": ("energon_jax.config", "GPT2Config"),
    "GPTModel": ("energon_jax.engine.gpt", "GPTModel"),
    "GenerationOutput": ("energon_jax.engine.gpt", "GenerationOutput"),
    "ParallelConfig": ("energon_jax.config", "ParallelConfig"),
    "QueueFull": ("energon_jax.serving", "QueueFull"),
    "RequestHandle": ("energon_jax.serving", "RequestHandle"),
    "Server": ("energon_jax.serving", "Server"),
    "initialize_distributed": ("energon_jax.runtime.distributed", "initialize"),
    "list_presets": ("energon_jax.loading", "list_presets"),
    "load_sharded_model": ("energon_jax.loading", "load_sharded_model"),
    "make_mesh": ("energon_jax.runtime.mesh", "make_mesh"),
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'energon_jax' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and editors, which do not run __getattr__
    from energon_jax.config import GPT2Config, ParallelConfig
    from energon_jax.engine.bert import BertModel, EncodeStats
    from energon_jax.engine.gpt import GenerationOutput, GPTModel
    from energon_jax.loading import list_presets, load_sharded_model
    from energon_jax.models.bert import BertConfig
    from energon_jax.runtime.distributed import initialize as initialize_distributed
    from energon_jax.runtime.mesh import make_mesh
    from energon_jax.serving import QueueFull, RequestHandle, Server
