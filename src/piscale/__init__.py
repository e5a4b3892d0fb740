"""piscale: probabilistic inference-time scaling of language models."""

__version__ = "0.1.0"
