"""kernels/_dispatch.py: implementation choice, mesh wrapping and their errors."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from energon_jax.kernels import _dispatch  # noqa: E402


def test_resolve_impl():
    assert _dispatch.resolve_impl("xla") == "xla"
    assert _dispatch.resolve_impl("triton") == "triton"
    assert _dispatch.resolve_impl("auto") == ("triton" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match=r"impl='Triton' is not one of \('auto', 'triton', 'xla'\)"):
        _dispatch.resolve_impl("Triton")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="jax-triton imports on a CUDA jax")
def test_jax_triton_off_gpu_says_what_to_do():
    with pytest.raises(ImportError, match="impl='xla'"):
        _dispatch.jax_triton()


def test_check_head_dim():
    _dispatch.check_head_dim(64)
    for d in (8, 48):
        with pytest.raises(ValueError, match=f"got {d}"):
            _dispatch.check_head_dim(d)


def _mesh(names=("data", "stage", "tensor")):
    devices = np.array(jax.devices()[:8])
    return Mesh(devices.reshape(2, 1, -1) if devices.size % 2 == 0 else devices.reshape(1, 1, -1), names)


def test_over_mesh_without_mesh_calls_directly():
    x = jnp.arange(6.0)
    assert _dispatch.over_mesh(lambda a: a * 2, None, (P("data"),), P("data"), x).tolist() == (x * 2).tolist()


def test_over_mesh_runs_per_shard():
    mesh = _mesh()
    x = jnp.arange(4 * 8.0).reshape(4, 8)
    # each device sees its own [B/data, N/tensor] block: a per-shard mean shows it
    out = _dispatch.over_mesh(lambda a: a - a.mean(), mesh, (P("data", "tensor"),), P("data", "tensor"), x)
    blocks = np.asarray(x).reshape(mesh.shape["data"], 4 // mesh.shape["data"], mesh.shape["tensor"], -1)
    want = blocks - blocks.mean(axis=(1, 3), keepdims=True)
    np.testing.assert_allclose(out, want.reshape(4, 8))


def test_over_mesh_errors():
    mesh = _mesh()
    if mesh.size == 1:
        pytest.skip("needs several devices")
    with pytest.raises(ValueError, match="does not divide over mesh axis 'tensor'"):
        _dispatch.over_mesh(lambda a: a, mesh, (P(None, "tensor"),), P(None, "tensor"), jnp.zeros((2, 3)))
    odd = _mesh(("batch", "stage", "model"))
    with pytest.raises(ValueError, match="lack"):
        _dispatch.over_mesh(lambda a: a, odd, (P("data"),), P("data"), jnp.zeros((8,)))


def test_auto_decode_attention_uses_xla_below_the_row_threshold():
    """impl="auto" on a GPU sends small decode batches (slots x heads below MIN_TRITON_DECODE_ROWS)
    to XLA's attention, where the Triton kernel is slower; larger ones to the kernel."""
    from energon_jax.engine import gpt
    from energon_jax.models.gpt2 import decode_attention_xla

    calls = []

    def fake_triton(q, k, v, lengths, *, scale):
        calls.append(q.shape)
        return q

    rng = np.random.default_rng(0)
    for b, n in [(1, 12), (2, 25), (32, 12), (64, 16)]:
        q = jnp.asarray(rng.standard_normal((b, n, 16)), jnp.float32)
        k = v = jnp.asarray(rng.standard_normal((b, n, 8, 16)), jnp.float32)
        lengths = jnp.full((b,), 5, jnp.int32)
        out = gpt._decode_by_size(fake_triton, q, k, v, lengths, scale=0.25)
        if b * n < gpt.MIN_TRITON_DECODE_ROWS:
            np.testing.assert_allclose(out, decode_attention_xla(q, k, v, lengths, scale=0.25))
        else:
            assert out is q
    assert calls == [(32, 12, 16), (64, 16, 16)]
    # under data x tensor parallel over 4 devices, 64 slots x 16 heads are 256 rows per device: Triton;
    # 32 x 12 are 96 per device: XLA
    for b, n, want_triton in [(64, 16, True), (32, 12, False)]:
        q = jnp.asarray(rng.standard_normal((b, n, 16)), jnp.float32)
        k = v = jnp.asarray(rng.standard_normal((b, n, 8, 16)), jnp.float32)
        out = gpt._decode_by_size(fake_triton, q, k, v, jnp.full((b,), 5, jnp.int32), scale=0.25, shards=4)
        assert (out is q) == want_triton


def test_auto_on_a_gpu_counts_one_devices_decode_rows(monkeypatch):
    """engine.gpt.attention_kernels with "auto" as on a GPU (resolve_impl patched): the decode
    dispatch counts rows per device of the data x tensor mesh, where the kernel runs."""
    from energon_jax.config import GPT2Config
    from energon_jax.engine import gpt
    from energon_jax.runtime.mesh import make_mesh

    monkeypatch.setattr(_dispatch, "resolve_impl", lambda impl: "triton")
    cfg = GPT2Config(vocab_size=64, n_positions=64, n_embd=64, n_layer=1, n_head=4)
    for (tp, dp), shards in [((1, 1), 1), ((2, 2), 4), ((4, 1), 4)]:
        kernels = gpt.attention_kernels(cfg, make_mesh(tp=tp, dp=dp), "auto")
        assert kernels.decode.func is gpt._decode_by_size and kernels.decode.keywords == {"shards": shards}
    assert gpt.attention_kernels(cfg, make_mesh(), "triton").decode.keywords["impl"] == "triton"


def _import_kernels_from_the_root(tmp_path, *python_flags, pythonpath=""):
    """`import kernels` in a Python started in the clone's root, where kernels/ is top-level."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import kernels; print(kernels.__file__); print(getattr(kernels, 'MARK', None)); "
            "import energon_jax.kernels as ours; print(ours.__file__)")  # -S: no editable install
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, *python_flags, "-c", code], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 or "No module named 'energon_jax.kernels'" in done.stderr, done.stderr
    return root, done.stdout.split("\n")[:3]


def test_the_kernels_folder_does_not_shadow_an_installed_kernels_package(tmp_path):
    # transformers >= 5.25 imports Hugging Face's `kernels` package; from the root, kernels/ came first
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("MARK = 'installed'\n")
    root, (found, mark, ours) = _import_kernels_from_the_root(tmp_path, pythonpath=str(tmp_path))
    assert (found, mark) == (str(tmp_path / "kernels" / "__init__.py"), "installed")
    assert ours == os.path.join(root, "kernels", "__init__.py")  # energon_jax.kernels is still ours


def test_with_no_kernels_package_installed_the_folder_is_what_import_kernels_gives(tmp_path):
    # -S: no site-packages, so no other `kernels` anywhere; energon_jax comes from the root folder
    root, (found, mark, _) = _import_kernels_from_the_root(tmp_path, "-S")
    assert (found, mark) == (os.path.join(root, "kernels", "__init__.py"), "None")
