"""CONTA-WSSS: weakly-supervised semantic segmentation with causal context adjustment."""

from src.utils.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
