"""Several hosts: one controller process per host, every one running the same script.

    import energon_jax as ej
    ej.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0)  # 1 on the other host
    model = ej.load_sharded_model(path, tp=4, dp=2)   # a mesh over every process's devices
    outs = model.generate(prompts)                    # the same prompts on every process

`initialize` wraps `jax.distributed.initialize`: after it, `jax.devices()` lists every process's
devices and the mesh spans them. The helpers below are how the engine stays SPMD: inputs become
global arrays from the host copy every process holds (`put_global`), results not all on this
process's devices are gathered before they reach numpy (`to_host`), and values a process could
pick alone (a random seed) are taken from process 0 (`same_seed`).
"""
from __future__ import annotations

import hashlib
import os

import jax
import numpy as np

from energon_jax.runtime.checks import check_int

# The environment variables `initialize` reads for an argument left None (JAX itself reads the first).
ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}

_joined: dict | None = None  # the arguments of the initialize that joined, for idempotent calls


def _int_arg(value, low: int, high: int | None, source: str, note: str = "") -> int:
    """An int argument or environment string, checked by the one check_int every layer uses."""
    if isinstance(value, str):  # from the environment
        try:
            value = int(value.strip())
        except ValueError:
            pass  # check_int rejects the string as it rejects any non-int, naming the accepted range
    return check_int(source, value, low, high, note)


def _check_address(value, source: str) -> str:
    msg = (f"{source}={value!r} must be 'HOST:PORT': process 0's host (a name, an IPv4 address or a "
           f"[bracketed] IPv6 one) and a free TCP port on it in [1, 65535], e.g. '10.0.0.1:1234'")
    if not isinstance(value, str):
        raise ValueError(msg)
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or host in ("[", "[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(msg)
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(msg)  # an IPv6 address without brackets: its last group would read as the port
    return value.strip()


def _resolve(coordinator_address, num_processes, process_id) -> dict:
    """The arguments, each from the call or else its environment variable, checked; None where neither."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    out = {}
    for name, value in given.items():
        source = name
        if value is None and os.environ.get(ENV_VARS[name], "").strip():
            value, source = os.environ[ENV_VARS[name]], ENV_VARS[name]
        if value is None:
            out[name] = None
        elif name == "coordinator_address":
            out[name] = _check_address(value, source)
        elif name == "num_processes":
            out[name] = _int_arg(value, 1, None, source)
        else:
            out[name] = (value, source)  # checked once num_processes is known
    if out["process_id"] is not None:
        value, source = out["process_id"]
        high = out["num_processes"] - 1 if out["num_processes"] is not None else None
        note = f" (num_processes={out['num_processes']})" if high is not None else ""
        out["process_id"] = _int_arg(value, 0, high, source, note)
    return out


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, timeout_s: int = 300) -> None:
    """Join this process to the others (`jax.distributed.initialize`); call it first, before any jax work.

    coordinator_address: 'HOST:PORT' of process 0, which serves the coordinator on that port (every
    process passes the same); num_processes: how many processes (hosts) in all; process_id: this
    one's, in [0, num_processes). An argument left None is read from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID; what is still None JAX detects on Slurm, Open MPI and TPU
    pods, else a ValueError says what to pass. local_device_ids: the devices this process uses
    (default all). timeout_s: how long to wait for the other processes.

    Calling it again with the same (or no) arguments does nothing; other arguments raise. After a
    plain `jax.distributed.initialize` it only checks the arguments against the running job. CPU
    processes exchange collectives through gloo.
    """
    global _joined
    args = _resolve(coordinator_address, num_processes, process_id)
    timeout_s = _int_arg(timeout_s, 1, None, "timeout_s")
    if jax.distributed.is_initialized():
        running = {"num_processes": jax.process_count(), "process_id": jax.process_index()}
        if _joined is not None:
            running["coordinator_address"] = _joined["coordinator_address"]
        clash = {k: (v, running[k]) for k, v in args.items() if v is not None and k in running and running[k] != v}
        if clash:
            said = ", ".join(f"{k}={a!r} (joined with {b!r})" for k, (a, b) in clash.items())
            raise RuntimeError(f"initialize_distributed: this process already joined a job; {said}. "
                               f"A process joins once: restart it to join another")
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        # without it CPU processes see each other's devices but cannot run one program over them
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(args["coordinator_address"], args["num_processes"], args["process_id"],
                                   local_device_ids=local_device_ids, initialization_timeout=timeout_s)
    except ValueError as e:  # JAX could not detect what was left None
        missing = [f"{k} ({ENV_VARS[k]})" for k, v in args.items() if v is None]
        raise ValueError(f"initialize_distributed: {e} Pass {', '.join(missing) or 'the arguments'} (or set the "
                         f"environment variables), or run under Slurm / Open MPI, which JAX detects") from None
    except RuntimeError as e:
        if "before" in str(e):  # jax's "must be called before any JAX computations are executed"
            raise RuntimeError("initialize_distributed must run before any jax computation in the process "
                               "(before load_sharded_model, make_mesh or jax.devices()): call it first in the "
                               "script") from None
        raise
    _joined = {**args, "num_processes": jax.process_count(), "process_id": jax.process_index()}


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def put_global(host: np.ndarray, sharding) -> jax.Array:
    """A host array that every process holds alike -> one jax.Array in `sharding`; each process
    copies only the slices of its own devices (the whole array never sits on one device)."""
    if sharding.is_fully_addressable:
        return jax.device_put(host, sharding)
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """A jax.Array -> numpy, gathering the shards other processes hold (every process must call it:
    it is a collective when the array is not all on this process's devices)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def same_seed(seed: int) -> int:
    """Process 0's `seed` on every process (a seed drawn at random differs per process)."""
    if not is_multiprocess():
        return seed
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.uint32(seed)))


def check_same_call(what: str, *parts) -> None:
    """Raise on every process when the processes called `what` with different inputs.

    An SPMD call (generate, encode) runs one program over every process's devices: processes that
    pass different prompts would compile different programs and hang, or mix their rows. The
    inputs' digests are compared across processes (one small collective)."""
    if not is_multiprocess():
        return
    from jax.experimental import multihost_utils

    h = hashlib.blake2b(digest_size=8)
    _digest(h, parts)
    mine = np.frombuffer(h.digest(), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 2]
    differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
    if differ:
        raise ValueError(f"{what}: processes {differ} were called with inputs that differ from process 0's; every "
                         f"process must call {what} with the same arguments (the same prompts, in the same order)")


def _digest(h, obj) -> None:
    """Feed `obj` (nested lists / tuples / dicts of numpy arrays and plain values) into hash `h`
    exactly: repr would abbreviate a large numpy array with '...'."""
    if isinstance(obj, np.ndarray):
        h.update(f"a{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (list, tuple)) and obj and set(map(type, obj)) <= {int}:  # token ids: C loops
        h.update(f"{type(obj).__name__[0]}i".encode())
        _digest(h, np.asarray(obj, np.int64))
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)}(".encode())
        for item in obj:
            _digest(h, item)
        h.update(b")")
    elif isinstance(obj, dict):
        _digest(h, sorted(obj.items(), key=lambda kv: repr(kv[0])))
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
