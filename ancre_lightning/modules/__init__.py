"""LightningModules per domain, on a shared base that exposes the wiring to callbacks."""

from .base import ConnectivityModule
from .classifier import ClassifierModule
from .diffusion import DiffusionModule
from .llm import LLMModule

__all__ = ["ClassifierModule", "ConnectivityModule", "DiffusionModule", "LLMModule"]
