"""Text encoders: one `EncoderBackend` protocol, backends chosen by `EncoderConfig.backend`."""

from tastemaker.encoder.base import EncoderBackend, create_backend

__all__ = ["EncoderBackend", "create_backend"]
