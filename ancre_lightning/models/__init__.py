"""Domain networks: embed -> ConnectedStack(blocks) -> norm -> head."""

from .llama import CausalLM

__all__ = ["CausalLM"]
