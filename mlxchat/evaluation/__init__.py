"""Evaluations: bits-per-byte, CORE, ChatCORE."""


def eval_batching() -> tuple[int, int]:
    """(CORE tokens per forward, categorical rows per forward) for this device.

    Batching evaluation forwards pays where a bigger matmul keeps more cores busy (a GPU). On
    a CPU, BLAS already uses every core for one example, and padding only adds work:
    bench/eval_throughput.py measured one example per forward 1.5x (d4) to 1.6x (d12) faster
    than batched here, for CORE-style scoring and for categorical ChatCORE alike.
    """
    import mlx.core as mx

    return (1, 1) if mx.default_device() == mx.cpu else (4096, 8)
