"""energon-jax: serve Bert- and GPT-style models sharded over a JAX device mesh."""
from energon_jax.config import GPT2Config, ParallelConfig
from energon_jax.engine.bert import BertModel, EncodeStats
from energon_jax.engine.gpt import GenerationOutput, GPTModel
from energon_jax.loading import list_presets, load_sharded_model
from energon_jax.models.bert import BertConfig
from energon_jax.runtime.distributed import initialize as initialize_distributed
from energon_jax.runtime.mesh import make_mesh
from energon_jax.serving import QueueFull, RequestHandle, Server

__all__ = [
    "BertConfig", "BertModel", "EncodeStats", "GPT2Config", "GPTModel", "GenerationOutput", "ParallelConfig",
    "QueueFull", "RequestHandle", "Server", "initialize_distributed", "list_presets", "load_sharded_model", "make_mesh",
]
__version__ = "0.1.0"
