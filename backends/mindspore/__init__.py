"""MindSpore backend."""
