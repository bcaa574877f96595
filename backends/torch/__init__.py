"""PyTorch backend: LocalMIM models, targets and training (same public surface as the MindSpore backend)."""
from localmim.backends.torch.vit import LocalMIMViT, build_model

__all__ = ["LocalMIMViT", "build_model"]
