"""Train the bundled `tiny-gpt2-pydoc` preset: a small GPT-2 on Python's own language reference.

The corpus is `pydoc_data.topics.topics` (the text `help("for")` prints, ~0.5 MB, shipped with
every CPython; its exact text depends on the Python version, recorded in training.json), its
entries joined in sorted key order with `<|endoftext|>` between them. A byte-level BPE tokenizer
is trained on the same text; the model is energon-jax's own Flax `GPT2` module trained with optax
(AdamW, warmup + cosine, dropout, bf16 matmuls on a GPU). Every `--eval-every` steps the held-out
loss is measured and the parameters with the lowest one are kept (the corpus is ~120k tokens, so
a longer run overfits; see `--keep`).

The output folder is a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer
files) that `energon_jax.load_sharded_model(folder)` and `transformers` both load, plus
`training.json` (command, sizes, losses, device, wall time, loss curve).

    python examples/train_tiny_gpt2.py --out energon_jax/presets/tiny-gpt2-pydoc   # the shipped model (GPU)
    python examples/train_tiny_gpt2.py --out /tmp/smoke --steps 5                 # CPU smoke run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax

from energon_jax.config import GPT2Config
from energon_jax.convert.gpt2 import config_to_hf, to_hf_state_dict
from energon_jax.models.gpt2 import GPT2, MLP, Attention, Block

EOS = "<|endoftext|>"
SAVE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output model folder (created or overwritten)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary, <|endoftext|> included")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-positions", type=int, default=256, help="context length (also the training window)")
    p.add_argument("--batch-size", type=int, default=16, help="windows of n_positions tokens per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.2,
                   help="training dropout on the embedding and on each attention / MLP output")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (not biases/norms)")
    p.add_argument("--val-every-block", type=int, default=20,
                   help="every k-th window of the token stream is held out for validation")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation passes")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="save the parameters with the lowest validation loss, or those of the last step")
    p.add_argument("--compute-dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="matmul dtype (master weights stay float32); auto: bfloat16 on GPU, float32 elsewhere")
    p.add_argument("--save-dtype", choices=tuple(SAVE_DTYPES), default="bfloat16")
    p.add_argument("--max-folder-mb", type=float, default=10.0,
                   help="refuse to write a folder larger than this many MB (1e6 bytes)")
    args = p.parse_args(argv)
    for name in ("steps", "vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "batch_size",
                 "val_every_block", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout={args.dropout} must be in [0, 1)")
    if args.val_every_block < 2:
        p.error(f"--val-every-block={args.val_every_block} must be >= 2 (1 would hold out everything)")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd={args.n_embd} is not divisible by --n-head={args.n_head}")
    return args


# ------------------------------------------------------------------------------------ data
def corpus() -> list[str]:
    """The language-reference topics of the running Python, in sorted key order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style: any text encodes, no unknown token) trained on `docs`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return tok


def split_blocks(ids: np.ndarray, block: int, every: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the stream into windows of `block` tokens; every `every`-th window is validation.

    Returns (train stream [N_train] with the held-out windows removed, val windows [W, block]).
    Spreading the held-out windows over the whole stream samples every topic, not just the last.
    """
    n_blocks = len(ids) // block
    blocks = ids[: n_blocks * block].reshape(n_blocks, block)
    is_val = (np.arange(n_blocks) % every) == every // 2
    train = np.concatenate([blocks[~is_val].ravel(), ids[n_blocks * block:]])
    return train, blocks[is_val]


# ----------------------------------------------------------------------------------- model
def residual_dropout(rate: float, key: jax.Array):
    """A Flax method interceptor adding GPT-2's training dropout to the (inference-only) GPT2 module.

    Drops units of the embedding output and of each block's attention and MLP outputs before
    they join the residual stream (HF's embd_pdrop / resid_pdrop). The layers run under
    `nn.scan`, so the block's traced layer counter (its carry) is folded into the key: every
    layer gets its own mask.
    """
    layer_key = {"key": None}

    def drop(x, k):
        keep = jax.random.bernoulli(k, 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

    def intercept(next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if isinstance(module, Block) and method == "__call__":
            layer_key["key"] = jax.random.fold_in(key, args[0][3] + 1)  # carry = (x, k, v, layer)
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        if isinstance(module, GPT2) and method == "embed":
            return drop(out, jax.random.fold_in(key, 0))
        if isinstance(module, Attention) and method == "__call__":
            return drop(out[0], jax.random.fold_in(layer_key["key"], 0)), out[1]
        if isinstance(module, MLP) and method == "__call__":
            return drop(out, jax.random.fold_in(layer_key["key"], 1))
        return out

    return nn.intercept_methods(intercept)


def make_loss_fn(module: GPT2, compute_dtype, dropout: float):
    def loss_fn(params, windows_bt1, dropout_key=None):
        """Mean next-token cross-entropy over [B, T+1] windows (inputs :-1, targets 1:).

        With a `dropout_key` (training) the forward runs with dropout at rate `dropout`.
        """
        tokens_bt, targets_bt = windows_bt1[:, :-1], windows_bt1[:, 1:]
        positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        # Master weights stay float32; the forward runs in compute_dtype (the head returns float32 logits).
        cast = jax.tree.map(lambda x: x.astype(compute_dtype), params)
        if dropout_key is not None and dropout > 0:
            with residual_dropout(dropout, dropout_key):
                logits_btv, _ = module.apply({"params": cast}, tokens_bt, positions_bt)
        else:
            logits_btv, _ = module.apply({"params": cast}, tokens_bt, positions_bt)
        return optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt).mean()

    return loss_fn


def make_optimizer(args) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=args.lr, warmup_steps=min(args.warmup_steps, max(args.steps - 1, 1)),
        decay_steps=args.steps, end_value=args.lr * args.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731 (matrices only)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask))


def make_steps(loss_fn, optimizer, train_ids: jax.Array, batch: int, window: int):
    @jax.jit
    def train_step(params, opt_state, key):
        # Random windows of the training stream, drawn on device (no host round trip per step).
        data_key, dropout_key = jax.random.split(key)
        starts_b = jax.random.randint(data_key, (batch,), 0, train_ids.shape[0] - window + 1)
        windows_bt1 = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(train_ids, s, window))(starts_b)
        loss, grads = jax.value_and_grad(loss_fn)(params, windows_bt1, dropout_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_loss(params, windows_wt1):
        return loss_fn(params, windows_wt1)

    return train_step, eval_loss


def mean_loss(eval_loss, params, windows: np.ndarray, batch: int) -> float:
    """Token-weighted mean loss over all `windows` (full-window batches, the last one shorter)."""
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i: i + batch]
        total += float(eval_loss(params, jnp.asarray(chunk))) * len(chunk)
    return total / len(windows)


# ------------------------------------------------------------------------------------ save
def save_folder(out: Path, params, cfg: GPT2Config, tokenizer, save_dtype: str, record: dict, max_mb: float) -> int:
    """Write the HF folder into a temp dir beside `out`, check its size, then move it in place."""
    from safetensors.numpy import save_file
    from transformers import PreTrainedTokenizerFast

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        tensors = {k: v.astype(SAVE_DTYPES[save_dtype]) for k, v in to_hf_state_dict(host, cfg).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS,
                                       model_max_length=cfg.n_positions)
        fast.save_pretrained(str(tmp))
        # transformers 5 writes its own class name ("TokenizersBackend"); 4.x knows only this one.
        tok_cfg_path = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        if size > max_mb * 1e6:
            raise SystemExit(f"the model folder would be {size / 1e6:.2f} MB > --max-folder-mb={max_mb}; "
                             f"choose smaller sizes or --save-dtype bfloat16")
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            f.chmod(0o644)  # some writers create 0600 files; package data must be world-readable
            os.replace(f, out / f.name)
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    backend = jax.default_backend()
    compute = {"auto": "bfloat16" if backend == "gpu" else "float32"}.get(args.compute_dtype, args.compute_dtype)

    docs = corpus()
    text_sha = hashlib.sha256(EOS.join(docs).encode()).hexdigest()[:16]
    tokenizer = train_tokenizer(docs, args.vocab_size)
    eos_id = tokenizer.token_to_id(EOS)
    stream = []
    for enc in tokenizer.encode_batch(docs):  # doc EOS doc EOS ...: EOS marks a topic's end
        stream.extend(enc.ids + [eos_id])
    stream = np.asarray(stream, np.int32)
    window = args.n_positions + 1
    train_np, val_np = split_blocks(stream, window, args.val_every_block)
    if len(train_np) < window or len(val_np) == 0:
        raise SystemExit(f"corpus of {len(stream)} tokens is too small for windows of {window}")
    print(f"corpus: {len(docs)} topics, {sum(map(len, docs))} chars (sha256 {text_sha}), {len(stream)} tokens; "
          f"train {len(train_np)} tokens, val {val_np.size} tokens ({len(val_np)} windows)", flush=True)

    cfg = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=args.n_positions, n_embd=args.n_embd,
                     n_layer=args.n_layer, n_head=args.n_head, bos_token_id=eos_id, eos_token_id=eos_id)
    module = GPT2(cfg, param_dtype=jnp.float32)
    dummy = jnp.zeros((1, 1), jnp.int32)
    params = nn.unbox(module.init(jax.random.key(args.seed), dummy, dummy)["params"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {cfg}\n{n_params / 1e6:.2f}M params; {backend} ({jax.devices()[0].device_kind}), "
          f"compute {compute}", flush=True)

    optimizer = make_optimizer(args)
    opt_state = optimizer.init(params)
    train_step, eval_loss = make_steps(make_loss_fn(module, jnp.dtype(compute), args.dropout), optimizer,
                                       jnp.asarray(train_np), args.batch_size, window)
    # A fixed sample of training windows, the size of the val set: train/val losses measured alike.
    rng = np.random.default_rng(args.seed)
    starts = rng.choice(len(train_np) - window + 1, size=len(val_np), replace=False)
    train_eval = np.stack([train_np[s: s + window] for s in starts])

    key = jax.random.key(args.seed + 1)
    curve, best = [], {"val_loss": float("inf")}
    best_params, recent = params, []
    t_train = time.perf_counter()
    for step in range(1, args.steps + 1):
        key, sub = jax.random.split(key)
        params, opt_state, loss = train_step(params, opt_state, sub)
        recent.append(loss)
        if step % args.eval_every == 0 or step == args.steps:
            batch_loss = float(np.mean(jax.device_get(recent)))  # training batches, with dropout
            recent = []
            val = mean_loss(eval_loss, params, val_np, args.batch_size)
            curve.append({"step": step, "batch_loss": round(batch_loss, 4), "val_loss": round(val, 4)})
            if val < best["val_loss"]:
                best, best_params = {"step": step, "val_loss": val}, params
            print(f"step {step:5d}  batch loss {batch_loss:.4f}  val loss {val:.4f}  "
                  f"{time.perf_counter() - t_train:6.1f} s", flush=True)
    train_seconds = time.perf_counter() - t_train

    kept = best_params if args.keep == "best" else params
    kept_step = best["step"] if args.keep == "best" else args.steps
    train_loss = mean_loss(eval_loss, kept, train_eval, args.batch_size)
    val_loss = mean_loss(eval_loss, kept, val_np, args.batch_size)
    record = {
        "command": "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))),
        "args": vars(args),
        "corpus": {"source": "pydoc_data.topics.topics (sorted keys, <|endoftext|> between entries)",
                   "python": platform.python_version(), "topics": len(docs), "chars": sum(map(len, docs)),
                   "sha256_16": text_sha, "tokens": int(len(stream)), "train_tokens": int(len(train_np)),
                   "val_tokens": int(val_np.size)},
        "model": {"vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": cfg.n_embd,
                  "n_layer": cfg.n_layer, "n_head": cfg.n_head, "params": int(n_params)},
        "kept": args.keep, "kept_step": kept_step,
        "train_loss": round(train_loss, 4), "val_loss": round(val_loss, 4),
        "last_step_val_loss": curve[-1]["val_loss"],
        "device": f"{backend}: {jax.devices()[0].device_kind}", "jax": jax.__version__, "optax": optax.__version__,
        "compute_dtype": compute, "save_dtype": args.save_dtype,
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - t_start, 1),
        "curve": curve,
    }
    size = save_folder(out, kept, cfg, tokenizer, args.save_dtype, record, args.max_folder_mb)
    print(f"kept step {kept_step} ({args.keep}): train loss {train_loss:.4f}, val loss {val_loss:.4f}; "
          f"wrote {out} ({size / 1e6:.2f} MB) in {record['wall_seconds']} s", flush=True)
    check_folder(out)
    return 0


def check_folder(out: Path, prompts=("The for statement", "A list comprehension", "The with statement")) -> None:
    """Load the written folder the way users do and print greedy continuations."""
    import energon_jax as ej

    model = ej.load_sharded_model(str(out))
    print(model)
    for prompt, gen in zip(prompts, model.generate(list(prompts), max_new_tokens=40)):
        print(f"--- {prompt!r} ->\n{prompt}{gen.text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
