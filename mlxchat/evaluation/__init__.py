"""Evaluations: bits-per-byte, CORE, ChatCORE."""
