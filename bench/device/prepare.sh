#!/usr/bin/env bash
# Here, before any device call: what the GPU machine lacks, into ignored folders of this checkout
# (a new checkout has none of them). See bench/README.md, "Recipe for the next GPU session".
#   bash bench/device/prepare.sh NANOCHAT_MIRROR    # the git dir `fetch github:karpathy/nanochat` gives
set -euo pipefail
cd "$(dirname "$0")/../.."
mirror=${1:?usage: bench/device/prepare.sh NANOCHAT_MIRROR}
mkdir -p .git/info
for d in /.whl/ /.nanochat/ /.ext/ /.gpu/ /.gpu_cache/ /.evh/ '/.exp*/'; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
platforms=(--platform manylinux_2_35_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" "$@"; }
rm -rf .whl && mkdir -p .whl/a .whl/b .ext
get -d .whl mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 rustbpe==0.1.0
get -d .ext nanobind==3.1.0
# mlx-cuda-13's wheel (~86 MiB) is over one call's 64 MiB carry: two halves over two back-to-back calls
split -n 2 -d .whl/mlx_cuda_13-0.32.4-*.whl .whl/cuda.part && rm .whl/mlx_cuda_13-*.whl
mv .whl/cuda.part00 .whl/a/ && mv .whl/cuda.part01 .whl/*.whl .whl/b/
# the cuDNN attention extension's headers (bench/README.md, ninth session): CUDA runtime, crt, cccl's nv/, cuDNN, its frontend
tmp=$(mktemp -d)
get -d "$tmp" "nvidia-cudnn-frontend==1.16.0" nvidia-cudnn-cu13 "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
  "nvidia-cuda-cccl==13.0.*"
for w in "$tmp"/*.whl; do unzip -q -o "$w" -d "$tmp/x" 'nvidia/*include*' 'include/*' 2>/dev/null || true; done
rm -rf "$tmp/x/nvidia/cu13/include/cccl"
tar czf .ext/headers.tgz -C "$tmp/x" nvidia include && rm -rf "$tmp"
rm -rf .nanochat && mkdir -p .nanochat && git -C "$mirror" archive c75fe54 | tar -x -C .nanochat && echo c75fe54 > .nanochat/COMMIT
du -sh .whl/a .whl/b .ext .nanochat
