"""Test set-up: 8 simulated CPU devices (before jax starts) and tiny Hugging Face models."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ENERGON_JAX_CACHE_DIR", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt2_factory(tmp_path_factory):
    """Build (and cache per config) a random HF GPT2LMHeadModel saved to a temp folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    made = {}

    def make(seed=0, init_std=0.2, **overrides):
        key = (seed, init_std, tuple(sorted(overrides.items())))
        if key not in made:
            kwargs = dict(vocab_size=101, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=100, eos_token_id=100, initializer_range=init_std)
            kwargs.update(overrides)
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(GPT2Config(**kwargs)).eval()
            folder = tmp_path_factory.mktemp("gpt2")
            model.save_pretrained(folder)
            made[key] = (folder, model)
        return made[key]

    return make
