"""irformer: image restoration Transformers with pluggable normalisation (i-LN)."""

__version__ = "0.1.0"
