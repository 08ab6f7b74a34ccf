"""Compression methods: each module scores channel units and plans removals with the engine's allocators; the
registry (registry.py) holds them by name with their metadata. Methods never edit graphs."""

from compressor.methods.registry import METHODS, Method, available, check_options, get, register

__all__ = ["METHODS", "Method", "available", "check_options", "get", "register"]
