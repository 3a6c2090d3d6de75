"""The cuDNN causal attention extension (`mlxchat.cudnn_attention`) against MLX's own attention.

It runs on MLX's CUDA backend only: without one (CI) this checks that `gpt.attend` keeps MLX's
attention and that a failed build falls back with one warning; the comparison runs on a CUDA GPU
(bench/README.md records its run on the H200).
"""

import logging
import sys
import threading
import time
import types

import mlx.core as mx
import pytest
from arrays import assert_close_at_scale

from mlxchat import cudnn_attention, gpt

needs_cuda = pytest.mark.skipif(not cudnn_attention.available(), reason="needs MLX's CUDA backend and the extension built")


def model_layout(B, H, T, D, dtype, seed=0):
    """q, k or v as `CausalSelfAttention` hands them over: (B, T, H, D) buffers viewed as (B, H, T, D)."""
    return mx.random.normal((B, T, H, D), key=mx.random.key(seed)).astype(dtype).transpose(0, 2, 1, 3)


def test_shapes_it_takes():
    q = model_layout(2, 4, 256, 64, mx.bfloat16)
    assert cudnn_attention.fits(q, q, q)
    assert not cudnn_attention.fits(q.astype(mx.float32), q.astype(mx.float32), q.astype(mx.float32))  # cuDNN: 16-bit only
    assert not cudnn_attention.fits(q, q[:, :, :128], q[:, :, :128])  # fewer keys than queries: not a T_q = T_kv mask
    assert not cudnn_attention.fits(q[:, :, :100], q[:, :, :100], q[:, :, :100])  # T not a multiple of 128
    kv = model_layout(2, 2, 256, 64, mx.bfloat16)
    assert cudnn_attention.fits(q, kv, kv)  # grouped-query heads
    wide = model_layout(1, 1, 128, 256, mx.bfloat16)
    assert not cudnn_attention.fits(wide, wide, wide)  # head_dim above 128


def test_attend_keeps_mlx_attention_where_the_extension_does_not_run(monkeypatch):
    monkeypatch.setenv(cudnn_attention.ENV, "0")
    assert not cudnn_attention.available()
    monkeypatch.setattr(cudnn_attention, "causal", lambda *a: pytest.fail("the extension ran with MLXCHAT_CUDNN_ATTENTION=0"))
    q, k, v = (model_layout(1, 2, 128, 64, mx.bfloat16, seed=i) for i in range(3))
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    assert mx.array_equal(gpt.attend(q, k, v, 0.125, "causal"), expected)


def test_a_failed_build_leaves_mlx_attention_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MLXCHAT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails every build
    cudnn_attention._extension.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mlxchat.cudnn_attention"):
            assert cudnn_attention._extension() is None
            assert cudnn_attention._extension() is None  # cached: no second build, no second warning
        warnings = [r for r in caplog.records if "cuDNN causal attention unavailable" in r.getMessage()]
        assert len(warnings) == 1
        assert not list(tmp_path.rglob("*.so"))  # nothing half-built is left to load
    finally:
        cudnn_attention._extension.cache_clear()


def test_concurrent_loads_build_once(monkeypatch, tmp_path):
    # two ranks of a data-parallel run load the extension at once: one compiles, the other waits for it
    target = tmp_path / "cudnn_attention" / "key" / "ext.so"
    builds = []

    def slow_build(path):
        builds.append(path)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        path.write_bytes(b"built")

    monkeypatch.setattr(cudnn_attention, "build", slow_build)
    threads = [threading.Thread(target=cudnn_attention.build_once, args=(target,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [target] and target.read_bytes() == b"built"


def fake_distribution(site, name, files):
    """An installed distribution as pip leaves it: the files, and a dist-info whose RECORD lists them."""
    info = site / f"{name.replace('-', '_')}-13.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 13.0.0\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_text("")


def test_headers_are_found_where_nvidias_wheels_install_them(monkeypatch, tmp_path):
    # the layouts of nvidia-cuda-runtime, -crt and -cccl 13.0 (CUDA's fp16 header includes CCCL's
    # <nv/target>: without that directory the build failed on the H200); cccl also ships a copy
    # under include/cccl, which is not an include root
    include = tmp_path / "nvidia" / "cu13" / "include"
    fake_distribution(tmp_path, "nvidia-cuda-runtime", ["nvidia/cu13/include/cuda_runtime.h"])
    fake_distribution(tmp_path, "nvidia-cuda-crt", ["nvidia/cu13/include/crt/host_defines.h"])
    fake_distribution(tmp_path, "nvidia-cuda-cccl", ["nvidia/cu13/include/nv/target", "nvidia/cu13/include/cccl/nv/target"])
    monkeypatch.syspath_prepend(str(tmp_path))
    nanobind = types.SimpleNamespace(include_dir=lambda: str(tmp_path / "nb" / "include"), source_dir=lambda: str(tmp_path / "nb" / "src"))
    monkeypatch.setitem(sys.modules, "nanobind", nanobind)
    found = [d for d in cudnn_attention.include_dirs() if tmp_path / "nvidia" in d.parents]
    assert found == [include] * 3


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim, seq", [(4, 4, 64, 256), (6, 6, 128, 512), (6, 3, 128, 256), (2, 2, 128, 128)])
@pytest.mark.parametrize("compiled", [False, True])
def test_causal_attention_and_its_gradients_equal_mlx(dtype, heads, kv_heads, head_dim, seq, compiled):
    q = model_layout(2, heads, seq, head_dim, dtype, seed=1)
    k, v = (model_layout(2, kv_heads, seq, head_dim, dtype, seed=s) for s in (2, 3))
    w = model_layout(2, heads, seq, head_dim, dtype, seed=4)
    scale = head_dim**-0.5

    def loss(attention):
        return lambda q, k, v: (attention(q, k, v).astype(mx.float32) * w).sum()

    ref = mx.value_and_grad(loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")), argnums=(0, 1, 2))
    ours = mx.value_and_grad(loss(lambda q, k, v: cudnn_attention.causal(q, k, v, scale)), argnums=(0, 1, 2))
    if compiled:
        ours = mx.compile(ours)
    (l_ref, g_ref), (l_ours, g_ours) = ref(q, k, v), ours(q, k, v)
    out_ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    out = cudnn_attention.causal(q, k, v, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_at_scale([(out_ref, out), *zip(g_ref, g_ours)], 2e-2)
    assert abs(l_ours.item() - l_ref.item()) <= 1e-2 * abs(l_ref.item()) + 0.5
