"""The release of Elemta (the OpenAPI document and ``elemta_build_info`` report it)."""

__version__ = "0.1.0"
