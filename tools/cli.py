"""`localmim`: the command line (pretrain, finetune, convert, visualize, plot, bench, demo, parity).

Each command lives in its own module `localmim.tools.<cmd>` exposing `add_arguments(parser)` and
`run(args) -> int`. Only the chosen command's module is imported, so `localmim --help` and a
config error never import torch or MindSpore. A command whose module does not exist yet prints
one line and exits 2; so does every user error (bad config, missing data folder, unavailable
backend, unreadable image): one sentence on stderr, no traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

__all__ = [
    "COMMANDS", "BACKENDS", "UserError", "BackendUnavailable", "main", "build_parser",
    "add_common_arguments", "config_from_args", "import_backend_module", "resolve_data_path",
]

# command -> (one-line help, why it may be missing)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "pretrain": ("LocalMIM pretraining from a YAML config (torch or mindspore backend)", ""),
    "finetune": ("fine-tune a pretrained encoder for image classification, or evaluate a fine-tuned one", ""),
    "convert": ("convert checkpoints between PyTorch, MindSpore, official LocalMIM/MAE and timm", ""),
    "visualize": ("render a checkpoint's multi-scale reconstructions of one image as a PNG", ""),
    "plot": ("draw a run's log.jsonl (losses per branch, lr, accuracies) as RUN_DIR/loss.png", ""),
    "bench": ("measure training throughput (images/s, step time, memory, MFU)", ""),
    "demo": ("train the small demo model on the bundled photographs and render a reconstruction", ""),
    "parity": ("compare the PyTorch and MindSpore backends on the same weights, images and masks", ""),
    "eval": ("quick evaluation of a pretrained encoder: k-NN or linear probe (top-1 / top-5)", ""),
    "data": ("write a labelled dataset that ships in a package as train/ and val/ class folders", ""),
}
# commands whose module is not localmim.tools.<command>
COMMAND_MODULES: Dict[str, str] = {"eval": "evaluate", "data": "datasets"}
BACKENDS = ("torch", "mindspore")
# Exit statuses (README "Command line"); 75 is backends.runs.PREEMPTED_EXIT_STATUS (EX_TEMPFAIL).
EXIT_STATUS_HELP = ("exit status: 0 done; 2 a user error or a checkpoint that cannot be written (one line on "
                    "stderr); 75 stopped by SIGTERM or SIGUSR1 after the current step, with a checkpoint "
                    "written (run the same command again to resume); 130 interrupted (Ctrl-C)")
# OS errors the environment causes (full disk, quota, read-only or forbidden folder): one line, no traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
FRAMEWORK_PACKAGES = {"torch": ("torch", "torchvision", "timm"), "mindspore": ("mindspore",)}


class UserError(Exception):
    """A problem with the user's input; main() prints its message as one line and exits 2."""


class BackendUnavailable(UserError):
    """The chosen backend is not built or its framework is not installed."""


# ----------------------------------------------------------------------------------------------
# Helpers shared by the command modules

def add_common_arguments(parser: argparse.ArgumentParser, default_config: Optional[str] = None,
                         config_note: str = "") -> None:
    """Options shared by pretrain, demo and finetune, plus trailing `section.key=value` overrides."""
    note = config_note or (f"default {default_config}" if default_config else "")
    parser.add_argument("--config", default=default_config, metavar="FILE",
                        help="YAML config file or bundled name (e.g. demo_vit, vit_base_hog)"
                             + (f"; {note}" if note else ""))
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="framework (default torch)")
    parser.add_argument("--data", metavar="DIR", help="image folder (flat, or class folders); sets data.path")
    parser.add_argument("--output", metavar="DIR", help="output folder; sets train.output_dir")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps; sets train.max_steps")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "ascend"), help="sets train.device")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.blr=1e-4 model.taps=[1,3,5,7]")


def config_from_args(args: argparse.Namespace, default_config: Optional[str] = None, kind: str = "pretrain"):
    """Load the config of `kind` named by --config, apply overrides, then
    --data/--output/--max-steps/--device."""
    from localmim.core.config import ConfigError, load_config, validate_config

    name = getattr(args, "config", None) or default_config
    if not name:
        example = "vit_base_hog" if kind == "pretrain" else "vit_base"
        raise ConfigError(f"no config given: pass --config FILE or a bundled name such as {example}")
    overrides = list(getattr(args, "overrides", None) or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"argument {bad[0]!r} is neither an option nor a section.key=value override")
    cfg = load_config(name, overrides, kind=kind)
    flags = []
    if getattr(args, "data", None) is not None:
        cfg.data.path = str(args.data)
        flags.append("--data")
    if getattr(args, "output", None) is not None:
        cfg.train.output_dir = str(args.output)
        flags.append("--output")
    if getattr(args, "max_steps", None) is not None:
        cfg.train.max_steps = int(args.max_steps)
        flags.append("--max-steps")
    if getattr(args, "device", None) is not None:
        cfg.train.device = str(args.device)
        flags.append("--device")
    if flags:
        validate_config(cfg, f"{name} with {' '.join(flags)}")
    return cfg


def resolve_data_path(cfg) -> str:
    """cfg.data.path, or the bundled sample photographs when it is null; the folder must exist."""
    if cfg.data.path is None:
        from localmim.tools.sample_images import sample_image_dir
        cfg.data.path = sample_image_dir()
    path = os.path.expanduser(str(cfg.data.path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data folder {cfg.data.path!r} does not exist or is not a folder (data.path / --data)")
    cfg.data.path = path
    return path


def import_backend_module(backend: str, module: str):
    """`localmim.backends.<backend>.<module>`, or BackendUnavailable naming what is missing."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    full = f"localmim.backends.{backend}.{module}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing in FRAMEWORK_PACKAGES[backend] or missing in ("torch", "mindspore"):
            raise BackendUnavailable(
                f"backend {backend!r} needs the Python package {missing!r}, which is not installed "
                f"(pip install 'localmim[{backend}]')") from None
        if e.name and (e.name == full or full.startswith(e.name + ".") or e.name.startswith("localmim.")):
            raise BackendUnavailable(
                f"backend {backend!r} is not built yet: module {e.name} is missing") from None
        raise


# ----------------------------------------------------------------------------------------------
# Parser and dispatch

def _command_module(cmd: str):
    """The module of `cmd`, or None when it does not exist yet."""
    name = f"localmim.tools.{COMMAND_MODULES.get(cmd, cmd)}"
    if importlib.util.find_spec(name) is None:
        return None
    module = importlib.import_module(name)
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        return None
    return module


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser; only the `selected` command's module is imported to add its options."""
    from localmim import __version__

    parser = argparse.ArgumentParser(
        prog="localmim",
        description="LocalMIM (Masked Image Modeling with Local Multi-Scale Reconstruction, CVPR 2023) "
                    "for PyTorch and MindSpore.",
        epilog=f"Run 'localmim <command> --help' for a command's options. {EXIT_STATUS_HELP}.")
    parser.add_argument("--version", action="version", version=f"localmim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for cmd, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_text, description=help_text, epilog=f"{EXIT_STATUS_HELP}.")
        if cmd == selected:
            module = _command_module(cmd)
            if module is not None:
                module.add_arguments(p)
                p.set_defaults(_module=module)
                continue
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(_module=None)
    return parser


def _selected_command(argv: Sequence[str]) -> Optional[str]:
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def _user_error_types() -> Tuple[type, ...]:
    from localmim.core.config import ConfigError
    from localmim.core.specs import SpecError
    from localmim.tools.sample_images import SampleImagesUnavailable
    return (UserError, ConfigError, SpecError, SampleImagesUnavailable, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, PermissionError)


def _is_user_error(e: BaseException) -> bool:
    """Known input errors, the ValueError / FloatingPointError / OSError subclasses that localmim
    defines (StateError, CheckpointError, the engines' non-finite-loss error, CheckpointWriteError,
    ...) and OS errors of a full, read-only or forbidden folder."""
    if isinstance(e, _user_error_types()):
        return True
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
        return True
    return (isinstance(e, (ValueError, FloatingPointError, OSError))
            and type(e).__module__.startswith("localmim."))


def _preemption_status(e: BaseException) -> Optional[int]:
    """The exit status of a run stopped on request (backends.runs.Preempted), else None."""
    from localmim.backends.runs import Preempted
    return e.exit_status if isinstance(e, Preempted) else None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _selected_command(argv)
    parser = build_parser(selected)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = args._module
    if module is None:
        why = COMMANDS[args.command][1] or f"module localmim.tools.{args.command} is missing"
        print(f"localmim {args.command}: not available yet ({why})", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"localmim {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user errors become one line, the rest a traceback
        status = _preemption_status(e)
        if status is not None:
            print(f"localmim {args.command}: {_one_line(e)}", file=sys.stderr)
            return status
        if not _is_user_error(e):
            raise
        print(f"localmim {args.command}: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
