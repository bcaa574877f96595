"""MindSpore backend: LocalMIM models, targets and training (same public surface as the torch backend).

Call `ensure_cpu_context()` before building Cells in a process that must run on CPU (tests,
parity checks): it selects the CPU device and PyNative mode once per process and is idempotent.
"""
import os

import mindspore as ms

_CONTEXT_SET = False


def ensure_cpu_context(deterministic: bool = True) -> None:
    """Select the CPU device, PyNative mode and (optionally) deterministic kernels, once per process.

    MindSpore refuses to change the device or the deterministic flag after they are set, so every
    MindSpore test and tool should go through this helper instead of calling them directly.
    It also caps the CPU kernel thread pool at the number of cores: MindSpore's default of 25
    threads makes every small op ~10x slower on a 2-core machine. Later calls do nothing.
    """
    global _CONTEXT_SET
    if _CONTEXT_SET:
        return
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ms.device_context.cpu.op_tuning.threads_num(max(1, min(os.cpu_count() or 1, 25)))
    except (AttributeError, RuntimeError):
        pass  # older MindSpore without device_context, or the pool is already configured
    if deterministic:
        try:
            ms.set_deterministic(True)
        except RuntimeError:
            pass  # already set earlier in this process by code outside this helper
    _CONTEXT_SET = True


from localmim.backends.mindspore.swin import LocalMIMSwin  # noqa: E402
from localmim.backends.mindspore.vit import LocalMIMViT  # noqa: E402


def build_model(spec):
    """The LocalMIM model for a spec: LocalMIMViT for a ViTSpec, LocalMIMSwin for a SwinSpec."""
    if spec.family == "swin":
        return LocalMIMSwin(spec)
    return LocalMIMViT(spec)


__all__ = ["LocalMIMViT", "LocalMIMSwin", "build_model", "ensure_cpu_context"]
