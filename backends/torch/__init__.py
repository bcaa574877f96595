"""PyTorch backend: LocalMIM models, targets and training (same public surface as the MindSpore backend)."""
from localmim.backends.torch.swin import LocalMIMSwin
from localmim.backends.torch.vit import LocalMIMViT


def build_model(spec):
    """The LocalMIM model for a spec: LocalMIMViT for a ViTSpec, LocalMIMSwin for a SwinSpec."""
    if spec.family == "swin":
        return LocalMIMSwin(spec)
    return LocalMIMViT(spec)


__all__ = ["LocalMIMViT", "LocalMIMSwin", "build_model"]
