"""mlxchat: nanochat's speedrun on MLX. The core library; it never imports Prefect."""

from mlxchat.cuda_queue import limit_queued_graphs

__version__ = "0.1.0"

limit_queued_graphs()  # before MLX starts a GPU stream: see cuda_queue.py
