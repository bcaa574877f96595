"""Backend-neutral core: numpy and yaml only, never a framework."""
