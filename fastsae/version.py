"""The package version, importable without the package root (which imports every layer)."""

__version__ = "0.1.0"
