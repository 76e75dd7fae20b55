"""The version of wacored (one place: the package, /health and the User-Agent read it)."""

VERSION = "0.1.0"
