"""How much GPU work MLX's CUDA backend may queue: a memory setting, made before MLX starts.

MLX records GPU work into CUDA graphs and keeps every buffer a graph touches alive until that
graph has run, with up to 10 graphs in flight. At its default for H100/H200-class GPUs (a graph
closes at 100 ops or 1000 MB) the buffers held that way were 12 GiB more than the training step
itself needs: d12, B32×2048 on an H200 peaked at 34.69 GiB, and at 250 MB per graph at 22.57 GiB,
2% faster (bench/README.md; 100 MB: 21.30 GiB, 50 MB: 21.01 GiB, 500 MB: 26.85 GiB).

MLX reads `MLX_MAX_MB_PER_BUFFER` once, when its first GPU stream starts, so this runs when
`mlxchat` is imported; a value the user set wins. Metal's own defaults (40–50 MB) are lower
already, so macOS is left alone.
"""

from __future__ import annotations

import os
import sys

MB_PER_GRAPH = "250"
ENV = "MLX_MAX_MB_PER_BUFFER"


def limit_queued_graphs() -> None:
    if sys.platform != "darwin":
        os.environ.setdefault(ENV, MB_PER_GRAPH)
