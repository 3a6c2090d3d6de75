"""Evaluations: bits-per-byte, CORE, ChatCORE."""


def eval_batching() -> tuple[int, int, int]:
    """(CORE tokens per forward, categorical rows per forward, greedy generations decoded
    together) for this device.

    Batching evaluation forwards pays where a bigger matmul keeps more cores busy (a GPU). On
    a CPU, BLAS already uses every core for one example, and padding only adds work:
    bench/eval_throughput.py measured one example per forward 1.5x (d4) to 1.6x (d12) faster
    than batched here, for CORE-style scoring and for categorical ChatCORE alike. Decoding is
    another matter on both: a step's time is launches and weight reads, nearly the same for 8
    rows as for one, so ChatCORE's generative tasks decode 8 problems together everywhere
    (bench/eval_throughput.py on the CPU: 2.4x at d12, 3.0x at d4; on an H200 the engine decoded
    6.2x the rows x tokens/s at batch 8 as at batch 1, bench/decode.py at d12).
    """
    import mlx.core as mx

    return (1, 1, 8) if mx.default_device() == mx.cpu else (4096, 8, 8)
