"""Importing mlxchat bounds the GPU work MLX's CUDA backend queues, unless the user chose."""

import os
import subprocess
import sys

from mlxchat import cuda_queue

SHOW = "import os, mlxchat; print(os.environ.get('MLX_MAX_MB_PER_BUFFER'))"


def _imported_value(env):
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_sets_the_graph_size_before_mlx_starts():
    env = {k: v for k, v in os.environ.items() if k != cuda_queue.ENV}
    assert _imported_value(env) == (cuda_queue.MB_PER_GRAPH if sys.platform != "darwin" else "None")


def test_a_value_the_user_set_wins():
    assert _imported_value({**os.environ, cuda_queue.ENV: "77"}) == "77"
