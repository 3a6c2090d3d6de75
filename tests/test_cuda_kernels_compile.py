"""Every CUDA kernel of `mlxchat.cuda_kernels` compiles for an H100/H200 (sm_90), without a GPU.

Why: the kernels run only on MLX's CUDA backend, which CI lacks, and a compile error in the shared
header would break every kernel at once on the first GPU that runs them. Where `nvcc` is installed,
each public function is called as the model calls it, with `mx.fast.cuda_kernel` replaced by a
recorder; the recorded source is wrapped the way MLX's JIT wraps it (its signature, template
constants and `<name>_shape` parameters; a small stand-in for MLX's device header) and compiled.
The register count ptxas reports is checked against what a launch of the recorded block size
allows: a kernel over the limit compiles but cannot launch ("too many resources requested"); and no
kernel may have a stack frame (local memory each thread fills, at a cost in bandwidth).
"""

import concurrent.futures
import os
import re
import shutil
import subprocess

import mlx.core as mx
import pytest

from mlxchat import cuda_kernels

NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs CUDA's nvcc (the CUDA toolkit)")

CUDA_TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.int32: "int32_t",
              mx.uint32: "uint32_t", mx.int64: "int64_t", mx.bool_: "bool"}
DEVICE_HEADER = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cooperative_groups.h>
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
"""
REGISTERS_PER_BLOCK = 65536  # sm_90
SINCOSF_STACK = 32  # bytes: sincosf's slow path (Payne–Hanek reduction)


class Recorder:
    """Stands in for `mx.fast.cuda_kernel`: keeps each launch's full source and block size and
    returns zero outputs of the asked shapes."""

    launches: list = []

    def __init__(self, name, input_names, output_names, source, header="", **_):
        self.name, self.inputs, self.outputs, self.source, self.header = name, input_names, output_names, source, header

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        args = []
        for name, x in zip(self.inputs, inputs):
            args.append(f"const {CUDA_TYPES[x.dtype]}* {name}")
            if f"{name}_shape" in self.source:
                args.append(f"const __grid_constant__ Shape {name}_shape")
            if f"{name}_strides" in self.source:
                args.append(f"const __grid_constant__ Strides {name}_strides")
            if f"{name}_ndim" in self.source:
                args.append(f"const __grid_constant__ int {name}_ndim")
        args += [f"{CUDA_TYPES[d]}* {name}" for name, d in zip(self.outputs, output_dtypes)]
        constants = "".join(f"  using {k} = {CUDA_TYPES[v]};\n" if isinstance(v, mx.Dtype)
                            else f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()};\n"
                            for k, v in template)
        source = (DEVICE_HEADER + self.header + "namespace mlx::core::cu {\n__global__ void " + self.name + "(\n    "
                  + ",\n    ".join(args) + ") {\n" + constants + self.source + "\n}\n}\n")
        Recorder.launches.append((self.name, source, min(threadgroup[0], grid[0])))
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]


def compile_kernel(tmp_path, index, name, source):
    path = tmp_path / f"{index}_{name}.cu"
    path.write_text(source)
    done = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "--cubin", "-Xptxas", "-v", "-o", str(path.with_suffix(".cubin")),
                           str(path)], capture_output=True, text=True)
    return done.returncode, done.stderr


def assert_recorded_kernels_compile_and_fit(tmp_path):
    """Compile every recorded launch (4 at a time) and check its registers against its block size."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: compile_kernel(tmp_path, i, *Recorder.launches[i][:2]), range(len(Recorder.launches))))
    for (name, _, block), (code, log) in zip(Recorder.launches, results):
        assert code == 0, f"{name} does not compile:\n{log[-3000:]}"
        registers = int(re.findall(r"Used (\d+) registers", log)[-1])
        assert registers * block <= REGISTERS_PER_BLOCK, f"{name}: {registers} registers × {block} threads cannot launch"
        # A stack frame is per-thread local memory, e.g. a run-time-indexed local table (pointers, sizes) that
        # every thread stores before its first load: 2.4 KB a thread held the gradient norm at 0.6 TB/s. The
        # one allowed is sincosf's 32-byte buffer for reducing huge arguments (rope's angles never are).
        stack = int(re.findall(r"(\d+) bytes stack frame", log)[-1])
        assert stack <= SINCOSF_STACK, f"{name}: {stack} bytes stack frame a thread"


def test_every_kernel_compiles_for_sm90_and_fits_its_block(monkeypatch, tmp_path):
    monkeypatch.setattr(mx.fast, "cuda_kernel", Recorder)
    cuda_kernels._kernel.cache_clear()
    Recorder.launches = []
    try:
        for dtype in (mx.bfloat16, mx.float32):
            z = mx.zeros((4, 65536 if dtype == mx.bfloat16 else 512), dtype)
            cuda_kernels.softcap_cross_entropy(z, mx.zeros((4,), mx.int32), mx.ones((4,)), 15.0)
            x = mx.zeros((2, 8, 1280), dtype)
            y, r = cuda_kernels.rms_norm(x, 1e-5)
            cuda_kernels.rms_norm_vjp(y, r, x)
            cuda_kernels.rms_norm_vjp(y, r, x, x)  # with the residual's cotangent
            q = mx.zeros((2, 8, 10, 128), dtype)
            inv_freq = mx.ones((64,))
            y, r = cuda_kernels.rope_norm(q, inv_freq, 1e-5)
            cuda_kernels.rope_norm_vjp(y, r, q, inv_freq)
            cache = mx.zeros((1, 6, 512, 128), dtype)
            cuda_kernels.decode_attention(mx.zeros((1, 6, 1, 128), dtype), cache, cache, mx.array(7), 0.1)
            cuda_kernels.sum_of_squares([mx.zeros((3, 5), dtype), mx.zeros((70000,), dtype)])
            matrices = [mx.zeros((1280, 5120), dtype)] * 20
            cuda_kernels.nesterov_momentum(matrices, [mx.zeros((1280, 5120))] * 20, mx.array(0.9), mx.array(1.0), mx.bfloat16)
            cuda_kernels.orthogonal_step([mx.zeros((1280, 5120))] * 20, mx.zeros((20, 1280, 5120), dtype), mx.array(0.02))
    finally:
        cuda_kernels._kernel.cache_clear()
    assert len(Recorder.launches) == 20
    assert_recorded_kernels_compile_and_fit(tmp_path)


def test_the_kernel_variants_in_bench_compile_and_fit_their_blocks(monkeypatch, tmp_path):
    """bench/group_kernels.py's and bench/loss_kernel.py's variants are measured only on a GPU: a
    compile error there would cost a device session its one call."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import group_kernels
    import loss_kernel

    monkeypatch.setattr(mx.fast, "cuda_kernel", Recorder)
    cuda_kernels._kernel.cache_clear()
    Recorder.launches = []
    try:
        grads, velocities = [mx.zeros((1280, 5120), mx.bfloat16)] * 20, [mx.zeros((1280, 5120))] * 20
        packs = max(group_kernels.ROUNDS)  # the most registers
        group_kernels.sum_of_squares(grads, packs)
        group_kernels.nesterov(grads, velocities, mx.array(0.9), mx.array(1.0), mx.bfloat16, packs)
        group_kernels.orthogonal_step(velocities, mx.zeros((20, 1280, 5120), mx.bfloat16), mx.array(0.02), packs)
        z, targets, weights = mx.zeros((4, 65536), mx.bfloat16), mx.zeros((4,), mx.int32), mx.ones((4,))
        for call in (loss_kernel.current_kernel(1024), loss_kernel.rounds_kernel(512, 4), loss_kernel.rounds_kernel(1024, 2),
                     loss_kernel.held_kernel(512, 4, 65536, 2), loss_kernel.held_kernel(256, 16, 65536, 2)):
            call(z, targets, weights)
    finally:
        cuda_kernels._kernel.cache_clear()
    assert len(Recorder.launches) == 8
    assert_recorded_kernels_compile_and_fit(tmp_path)


@pytest.mark.parametrize("first_blocks", [[0], [0, 3], [0, 3, 4, 9, 10, 20, 21]])
def test_block_owner_tree_finds_each_blocks_array(tmp_path, first_blocks):
    """`cuda_kernels._block_owner`'s comparison tree, compiled for the host with blockIdx.x stubbed:
    every block lands on the last array whose first block is ≤ it."""
    import bisect

    total = first_blocks[-1] + 5
    tree = cuda_kernels._block_owner(first_blocks, "int k; unsigned int first;", lambda i: f"k = {i}; first = {first_blocks[i]}u;")
    path = tmp_path / "owner.cpp"
    path.write_text("#include <cstdio>\nstruct { unsigned int x; } blockIdx;\nint main() {\n"
                    f"  for (blockIdx.x = 0; blockIdx.x < {total}u; ++blockIdx.x) {{\n{tree}"
                    '  std::printf("%d %u\\n", k, first);\n  }\n}\n')
    built = subprocess.run([NVCC, "-x", "c++", "-o", str(tmp_path / "owner"), str(path)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    out = subprocess.run([str(tmp_path / "owner")], capture_output=True, text=True, check=True).stdout.split("\n")
    for b in range(total):
        k = bisect.bisect_right(first_blocks, b) - 1
        assert out[b] == f"{k} {first_blocks[k]}", f"block {b}"
