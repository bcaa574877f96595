"""The core (and the framework-free shared backend modules) never import a framework."""
import subprocess
import sys

CORE_MODULES = ["config", "files", "keymaps", "layouts", "masking", "param_groups", "pos_embed", "resample",
                "schedule", "specs", "state", "swin_plan", "targets"]


def test_core_and_shared_modules_import_no_framework():
    imports = [f"localmim.core.{m}" for m in CORE_MODULES] + [
        "localmim.backends.images", "localmim.backends.loop", "localmim.backends.runs", "localmim.backends.tensorboard",
        "localmim.backends.weights",
        "localmim.tools.cli", "localmim.tools.heldout"]
    code = (f"import importlib, sys\nfor m in {imports!r}: importlib.import_module(m)\n"
            "loaded = [f for f in ('torch', 'mindspore', 'timm', 'torchvision') if f in sys.modules]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
