# The headline on the GPU: d20 then d12, ours (and queued) against nanochat, in one warm stretch.
#   device call 2, carry [".whl/b", ".ext", ".nanochat"]:  bash bench/device/headline.sh SUFFIX
source bench/device/env.sh
tag=${1:?usage: headline.sh SUFFIX (names the result files)}
nvidia-smi --query-gpu=name,memory.total --format=csv
for depth in 20 12; do
  timeout 280 python3 bench/train_step.py --depth $depth --batch 32 --seq-len 2048 --vocab 65536 --variants ours,ours-queued \
    --torch --nanochat-src .nanochat --warmup 8 --steps 20 --json "$OUT/gpu_d${depth}_b32_${tag}.json" 2>&1 | tail -20
done
save_caches
