"""The package version, importable without torch (``flipnet --version``)."""

__version__ = "0.1.0"
