"""Adapters for other libraries (optional dependencies, imported on demand)."""
