"""Prefect tasks: one per speedrun stage, thin wrappers over `mlxchat.pipeline`."""
