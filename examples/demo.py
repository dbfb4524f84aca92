"""`make demo`: load the bundled tiny GPT-2 and generate text about Python.

The preset `tiny-gpt2-pydoc` is a ~4M-parameter GPT-2 trained on Python's language reference
(examples/train_tiny_gpt2.py); it ships inside the package, so this runs offline, on a CPU too.
"""
import time

import energon_jax as ej

PROMPTS = ["The for statement", "A list comprehension", "The with statement", "An exception is raised"]
MAX_NEW_TOKENS = 48

model = ej.load_sharded_model("tiny-gpt2-pydoc")
print(model, "\n")

# Greedy (temperature 0): all prompts in one batched call. The first call compiles.
t0 = time.perf_counter()
outs = model.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
first = time.perf_counter() - t0
for prompt, out in zip(PROMPTS, outs):
    print(f"[greedy] {prompt}{out.text}\n")

# Sampled: temperature 0.8, top-k 40; a fixed seed makes it repeatable.
sampled = model.generate([PROMPTS[2]], max_new_tokens=MAX_NEW_TOKENS, temperature=0.8, top_k=40, seed=0)[0]
print(f"[sampled, temperature 0.8, top_k 40, seed 0] {PROMPTS[2]}{sampled.text}\n")

# Time the same batched call again, now compiled (sampling parameters are traced: no recompile).
t0 = time.perf_counter()
outs = model.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
second = time.perf_counter() - t0
n_tokens = sum(len(o.token_ids) for o in outs)
platform = model.mesh.devices.flat[0].platform
print(f"batched generate of {len(PROMPTS)} prompts: first call {first:.2f} s (includes compiling or reading "
      f"the compile cache), second call {second:.3f} s = {n_tokens / second:,.0f} new tokens/s on {platform}")
