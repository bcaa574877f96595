"""Bundled YAML recipes (package data)."""
