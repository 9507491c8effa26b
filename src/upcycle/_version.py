"""The package version, written once: setuptools reads it for the metadata, the CLI and upcycle.json for provenance."""

__version__ = "0.1.0"
