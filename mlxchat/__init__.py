"""mlxchat: nanochat's speedrun on MLX. The core library; it never imports Prefect."""

__version__ = "0.1.0"
