"""photostack: a photo-sharing back end built as a complete scalable system."""

__all__ = ["__version__"]

__version__ = "0.1.0"
