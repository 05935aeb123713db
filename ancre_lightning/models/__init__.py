"""Domain networks: embed -> ConnectedStack(blocks) -> norm -> head."""

from .dit import DiT
from .llama import CausalLM
from .mixer import MLPMixer
from .resnet import ResNet
from .vit import VisionTransformer

__all__ = ["CausalLM", "DiT", "MLPMixer", "ResNet", "VisionTransformer"]
