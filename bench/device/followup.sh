# After headline.sh on the same warm machine: d20 with a larger CUDA graph cache, the GPU tests of the
# kernels and of what changed on the CPU side since, and the evaluations' batching on the GPU.
#   bash bench/device/followup.sh SUFFIX
source bench/device/env.sh
tag=${1:?usage: followup.sh SUFFIX}
MLX_CUDA_GRAPH_CACHE_SIZE=2000 timeout 200 python3 bench/train_step.py --depth 20 --batch 32 --seq-len 2048 --vocab 65536 \
  --variants ours,ours-queued --warmup 8 --steps 20 --json "$OUT/gpu_d20_b32_${tag}_graphcache2000.json" 2>&1 | tail -8
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cpu_attention.py \
  tests/test_engine.py tests/test_chat_eval.py 2>&1 | tail -5
H=/tmp/h; python3 -m mlxchat.cli --home $H data prepare-smoke > /dev/null && cp -r .evh/evals $H/ 2>/dev/null \
  && timeout 150 python3 bench/eval_throughput.py --home $H --depths 12 --json "$OUT/gpu_eval_throughput_d12_${tag}.json"
save_caches
