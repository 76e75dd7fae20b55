"""wacored: the WhatsApp webhook core router daemon."""

from .version import VERSION as __version__

__all__ = ["__version__"]
