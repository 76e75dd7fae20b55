"""wacored: the WhatsApp webhook core router daemon."""

from .runtime import VERSION as __version__

__all__ = ["__version__"]
