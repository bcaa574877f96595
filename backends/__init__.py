"""Backends: `localmim.backends.torch` and `localmim.backends.mindspore` (same public surface)."""
