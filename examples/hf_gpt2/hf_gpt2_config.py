"""Energon's hf_gpt2_config.py, for energon-jax:  energon service init --config_file=hf_gpt2_config.py

The keys are Energon's. model_class names a model folder or bundled preset (Energon took a builder
function); checkpoint, when set, is the model folder and wins. Energon's RPC keys (host, port,
backend, engine_server) are accepted and ignored: one JAX controller drives every device.
Then:  curl 'http://127.0.0.1:8020/run_hf_gpt2/I%20do%20not?max_seq_length=16'
"""
# for engine
model_class = "tiny-gpt2-pydoc"  # or a Hugging Face GPT-2 folder, e.g. "/data/hf_gpt2"
model_type = "gpt"
max_batch_size = 16  # decode slots: concurrent generations
half = False  # True: float16 weights

# for parallel
tp_init_size = 1
pp_init_size = 1

# for server
# tokenizer_path = "/data/hf_gpt2"  # a folder with tokenizer files, when the model folder has none
rm_padding = False  # Bert only; energon-jax always packs sequences (equal results, no padding computed)
server_host = "127.0.0.1"
server_port = 8020
log_level = "info"
