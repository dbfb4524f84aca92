"""Test set-up: 8 simulated CPU devices (before jax starts) and tiny Hugging Face models."""
import os

# 8 simulated devices for sharding tests; LLVM optimisation off: tiny test models run in
# microseconds either way, and it makes CPU compiles about 3x faster.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + [
    f for f in _FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ENERGON_JAX_CACHE_DIR", "off")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton reads this once, at its first import: the kernel tests run the kernels' source through
# Triton's interpreter with torch CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
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
            with torch.no_grad():  # HF starts layer norms at scale 1, bias 0: give them values
                for m in model.modules():
                    if isinstance(m, torch.nn.LayerNorm):
                        m.weight.normal_(1.0, 0.2)
                        m.bias.normal_(0.0, 0.2)
            folder = tmp_path_factory.mktemp("gpt2")
            model.save_pretrained(folder)
            made[key] = (folder, model)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_bert_factory(tmp_path_factory):
    """Save a random HF Bert (BertModel, or head="mlm" for BertForMaskedLM) of a tiny config to
    a temp folder; returns (folder, model). Layer sizes default to 2 layers of width 32, 4 heads."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    def make(head="base", seed=0, **overrides):
        kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64, type_vocab_size=2, initializer_range=0.2)
        kwargs.update(overrides)
        torch.manual_seed(seed)
        model = (BertForMaskedLM if head == "mlm" else BertModel)(BertConfig(**kwargs)).eval()
        folder = tmp_path_factory.mktemp(f"bert_{head}")
        model.save_pretrained(folder)
        return folder, model

    return make


@pytest.fixture(scope="session")
def gpt2_with_tokenizer(tmp_path_factory):
    """A tiny random GPT-2 folder with a real byte-level BPE tokenizer trained on a few sentences."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    text = ["the cat sat on the mat", "a for statement loops over a sequence", "the with statement",
            "functions return values", "lists and tuples and dictionaries"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("gpt2tok")
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=eos, eos_token_id=eos, initializer_range=0.2)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Each test starts with the SIGINT / SIGTERM handlers the one before it started with: a
    handler left by one test (an in-process server's, a CLI's) changed how later tests in the same
    worker saw a signal (under xdist, which tests share a process varies from run to run)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)
