# Sourced first by every device script (`source bench/device/env.sh`): installs the carried wheels
# once per warm machine (call 1 left cuda.part00 in /root/stash), unpacks the extension's headers
# and any JIT caches, sets the paths. save_caches puts MLX's and the driver's JIT caches under $OUT.
set -e
if [ ! -d /tmp/site/mlx ]; then
  cat /root/stash/cuda.part00 .whl/b/cuda.part01 > /tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/mlx_cuda_13-*.whl .whl/b/*.whl .ext/nanobind-*.whl
fi
[ -d /tmp/ext/include ] || { mkdir -p /tmp/ext && tar xzf .ext/headers.tgz -C /tmp/ext; }
[ -f /root/stash/mlxptx.tgz ] && [ ! -d /tmp/mlx ] && tar xzf /root/stash/mlxptx.tgz -C /tmp || true
[ -f /root/stash/nvcache.tgz ] && [ ! -d ~/.nv ] && tar xzf /root/stash/nvcache.tgz -C ~ || true
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export CPATH=/tmp/ext/nvidia/cu13/include:/tmp/ext/include:/tmp/ext/nvidia/cudnn/include
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.device_info()['device_name'], mx.__version__)"
save_caches() { tar czf "$OUT/mlxptx.tgz" -C /tmp mlx 2>/dev/null || true; tar czf "$OUT/nvcache.tgz" -C ~ .nv 2>/dev/null || true; }
