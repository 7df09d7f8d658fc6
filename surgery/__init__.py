"""surgery: find the attention heads and FFN neurons that carry a behaviour, cut them, ship the result."""

__version__ = "0.1.0"
