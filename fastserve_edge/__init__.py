"""fastserve-edge: chat with a large language model on a home-lab cluster of CPU machines."""

__version__ = "0.1.0"
