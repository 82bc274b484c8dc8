"""arvision: visual autoregressive image-generation paradigms compared on equal footing."""

__version__ = "0.1.0"
