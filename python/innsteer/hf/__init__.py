"""The Hugging Face layer: model loading, decoder-layer lookup, prompt formatting, activation
collection and steering hooks. Depends on ``innsteer.core`` and ``innsteer.datasets``."""
