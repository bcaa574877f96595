"""localmim: LocalMIM pretraining with interchangeable PyTorch and MindSpore backends."""
__version__ = "0.1.0"
