"""Fixtures shared by every test folder: tiny specs, images, core-sampled masks, relative errors,
image folders and the sample photographs. A backend folder's conftest adds only what needs its
framework (`mask_tensors`, contexts, numpy references of its layers)."""
import types

import numpy as np
import pytest

from localmim.core import masking
from localmim.core.specs import TargetSpec, get_spec


def pytest_configure(config):
    """One torch thread: the tests run tiny models on 2 cores, and once MindSpore's CPU thread pool
    is loaded in the same process, torch's OpenMP threads contend with it (measured on vit_demo:
    a training step took 5 s with 2 threads, 0.1 s with 1)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture
def image_folder(tmp_path):
    """Factory: image_folder(n=4, size=64, mode="RGB", nested=False) -> path of a folder of PNGs.

    Images are smooth random colour fields (deterministic per index), so HOG and pixel targets
    are non-trivial. nested=True puts them in two class sub-folders (ImageFolder layout).
    """
    from PIL import Image

    def make(n: int = 4, size: int = 64, mode: str = "RGB", nested: bool = False, name: str = "images"):
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        for i in range(n):
            rng = np.random.default_rng(i)
            a, b, c = rng.uniform(1.0, 6.0, size=3)
            img = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))], -1)
            arr = ((img * 0.5 + 0.5) * 255).astype(np.uint8)
            folder = root / f"class{i % 2}" if nested else root
            folder.mkdir(exist_ok=True)
            Image.fromarray(arr).convert(mode).save(folder / f"img{i:03d}.png")
        return str(root)

    return make


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The bundled sample photographs, written once per test session into a temporary cache."""
    from localmim.tools.sample_images import sample_image_dir

    return sample_image_dir(str(tmp_path_factory.mktemp("localmim_cache")))


# ---------------------------------------------------------------------------------------- tiny specs
@pytest.fixture
def tiny_spec():
    """vit_tiny_test: 32 px, patch 8 (4x4 grid), width 32, 4 blocks all tapped, HOG 9 bins."""
    return get_spec("vit_tiny_test")


@pytest.fixture
def tiny64_spec():
    """The tiny ViT at 64 px: 8x8 patch grid, four branches with 32, 16, 8, 4 output grids."""
    return get_spec("vit_tiny_test", img_size=64)


@pytest.fixture
def tiny_bias_spec():
    """Tiny ViT at 64 px with 18-bin HOG and the frozen per-scale gradient biases (ViT-L style)."""
    return get_spec("vit_tiny_test", img_size=64, target=TargetSpec(kind="hog", nbins=18, hog_bias=True))


@pytest.fixture
def tiny_pixel_spec():
    """Tiny ViT with normalised-pixel targets."""
    return get_spec("vit_tiny_test", target=TargetSpec(kind="pixel", norm_pix=True))


# ---------------------------------------------------------------------------------------- helpers
def make_images(batch, size, seed=0):
    """Smooth-plus-noise float32 (B, 3, S, S) images in ImageNet-normalised range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - x), x * y * 2 - 1])[None]
    noise = rng.normal(0.0, 0.5, size=(batch, 3, size, size)).astype(np.float32)
    return (base + noise).astype(np.float32)


def eight_bit_images(seed, batch=2, size=32):
    """Photograph-like inputs, (B, 3, S, S) float32: random pixels from four 8-bit levels, every
    fifth row constant, normalised like the data pipeline. Many pixels then have a gradient that
    is exactly zero (equal neighbours, or top and bottom rows that cancel), the case where a
    framework convolution leaves +-1 ulp residues of either sign (about 10% of them here)."""
    from localmim.core.targets import IMAGENET_MEAN, IMAGENET_STD
    rng = np.random.default_rng(seed)
    v = rng.choice(np.array([0, 64, 128, 255], np.float32), size=(batch, 3, size, size))
    v[:, :, ::5, :] = rng.choice(np.array([0, 64, 128, 255], np.float32), size=(batch, 3, 1, 1))
    mean = np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return ((v / np.float32(255.0) - mean) / std).astype(np.float32)


def make_mask(spec, batch, ratio=0.75, step=0):
    """A core.masking.VitMask for `spec`'s patch grid."""
    return masking.vit_mask(masking.mask_rng(0, 0, step, 0), batch, spec.num_patches, ratio)


def to_numpy(a):
    """A numpy array from numpy, a torch tensor or a MindSpore tensor."""
    if hasattr(a, "asnumpy"):
        return a.asnumpy()
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def rel_err(a, b):
    """max |a - b| / max |b| as a float (numpy arrays, torch or MindSpore tensors)."""
    a = np.asarray(to_numpy(a), dtype=np.float64)
    b = np.asarray(to_numpy(b), dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def mask_tensors():
    """VitMask -> the ViT models' masks argument {"ids_keep", "ids_restore", "mask"}: numpy arrays
    here; the torch and MindSpore folders override it with their tensors."""
    return lambda m: dict(m.as_dict())


@pytest.fixture(scope="module")
def h(mask_tensors):
    """The helper functions above as one fixture (tests do not import `conftest` by name)."""
    return types.SimpleNamespace(make_images=make_images, eight_bit_images=eight_bit_images, make_mask=make_mask,
                                 mask_tensors=mask_tensors, rel_err=rel_err, to_numpy=to_numpy)


# ---------------------------------------------------------------------------------------- fault runs
# Helpers of tests/torch/test_faults.py and tests/mindspore/test_faults.py: `localmim pretrain` in
# a child process, killed or signalled at a given checkpoint, or run on a tiny filesystem.

# A process that imports a backend once and then forks one child per run: each child is a fresh
# process that runs cli.main(argv) in its own session, as `localmim pretrain ...` would, without
# paying the framework's import again (5-10 s on 2 busy cores). Reads one JSON job per line
# {"argv", "out", "err", "status", "tmpfs"}, answers the child's pid, writes its exit code to
# "status". Where `unshare -rm` works the zygote lives in its own user + mount namespace, so a
# job's child may mount a small tmpfs (tmpfs: {"dir", "size_kb", "copy_to"}: mounted before the
# run, its files copied to copy_to after it; seen by no process outside).
_ZYGOTE = r"""
import importlib, json, os, shutil, subprocess, sys, traceback
setup, modules = sys.argv[1], sys.argv[2:]
from localmim.tools import cli
sys.argv = [cli.__file__]  # as under `python -m localmim.tools.cli` (MindSpore's compile cache reads it)
for name in modules:
    importlib.import_module(name)
exec(setup)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        for fd, path in ((1, job["out"]), (2, job["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        small = job.get("tmpfs")
        if small:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dk" % small["size_kb"], "tmpfs", small["dir"]],
                           check=True)
        try:
            code = cli.main(job["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        if small:
            shutil.copytree(small["dir"], small["copy_to"], dirs_exist_ok=True)
            subprocess.run(["umount", small["dir"]], check=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    with open(job["status"] + ".tmp", "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(job["status"] + ".tmp", job["status"])
os._exit(0)  # no interpreter teardown of the framework
"""


class ForkedRun:
    """One run of the zygote: pid (its own process group), poll() / wait(timeout) -> exit code
    (negative: killed by that signal), None while it runs."""

    def __init__(self, pid, status_path):
        self.pid, self._status, self.returncode = pid, status_path, None

    def poll(self):
        import os
        if self.returncode is None and os.path.exists(self._status):
            with open(self._status) as f:
                self.returncode = int(f.read())
        return self.returncode

    def wait(self, timeout=300.0):
        import time
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            assert time.monotonic() < deadline, f"run {self.pid} still going after {timeout} s"
            time.sleep(0.01)
        return self.returncode


class Zygote:
    """zygote = Zygote("localmim.backends.torch.engine", ..., setup="") (the modules to import
    once, then Python code to run once); run = zygote.start(argv, log_dir, name) (argv:
    cli.main's arguments; stdout / stderr in <log_dir>/<name>.out / .err); close()."""

    def __init__(self, *modules, setup=""):
        import os
        import subprocess
        import sys
        env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread, as the tests' own runs (pytest_configure)
        self.small_filesystem = _small_filesystem_works()
        command = [sys.executable, "-c", _ZYGOTE, setup, *modules]
        self._proc = subprocess.Popen((["unshare", "-rm"] if self.small_filesystem else []) + command,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def start(self, argv, log_dir, name, tmpfs=None):
        """tmpfs: {"dir", "size_kb", "copy_to"} to run on a small filesystem (needs small_filesystem)."""
        import json
        import os
        paths = {k: os.path.join(str(log_dir), f"{name}.{k}") for k in ("out", "err", "status")}
        if tmpfs is not None:
            assert self.small_filesystem, "no tmpfs can be mounted here"
            tmpfs = {k: (str(v) if k != "size_kb" else int(v)) for k, v in tmpfs.items()}
            os.makedirs(tmpfs["dir"], exist_ok=True)
        self._proc.stdin.write(json.dumps(dict(paths, argv=[str(a) for a in argv], tmpfs=tmpfs)) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        assert line, "the zygote process died"
        return ForkedRun(int(line), paths["status"])

    def run(self, argv, log_dir, name, timeout=300.0, tmpfs=None):
        """start() and wait: the exit code."""
        return self.start(argv, log_dir, name, tmpfs).wait(timeout)

    def close(self):
        self._proc.stdin.close()
        self._proc.wait(timeout=60)


def _fault_config(root, steps, **train):
    """A tiny run's config file in `root`: vit_tiny_test (32 px) on 8 images of `root`/images,
    batch 2 (4 steps an epoch), `steps` steps, a log line and a checkpoint after every step (the
    newest 2 kept); `train` adds train keys. Returns its path."""
    import yaml
    from PIL import Image
    images = root / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "vit_tiny_test"},
        "data": {"path": str(images), "batch_size": 2, "num_workers": 0},
        "optim": {"lr": 2e-3, "epochs": 4, "warmup_epochs": 1},
        "train": dict({"max_steps": steps, "log_every": 1, "save_every_steps": 1, "keep_checkpoints": 2,
                       "progress": False, "seed": 3, "device": "cpu"}, **train)}))
    return config


def _pretrain_argv(backend, config, output, *extra):
    """cli.main's argv for `localmim pretrain` of `config` into `output`."""
    return ["pretrain", "--backend", backend, "--config", str(config), "--output", str(output), *map(str, extra)]


def _newest_step(folder, ext):
    """The highest step of the checkpoint-<step><ext> files in `folder`, -1 when there is none."""
    import os
    import re
    steps = [int(m.group(1)) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
             for m in [re.match(r"^checkpoint-(\d+)" + re.escape(ext) + "$", n)] if m]
    return max(steps, default=-1)


def _signal_at(run, folder, ext, step, delay, signum, timeout=300.0):
    """Wait until `folder` holds checkpoint-<step or later>, sleep `delay` s, send `signum` to the
    process group of `run` (the run and its loader workers, as SLURM signals a job step) and
    return its exit code."""
    import os
    import time
    deadline = time.monotonic() + timeout
    while _newest_step(folder, ext) < step:
        assert run.poll() is None, f"the run ended (code {run.returncode}) before checkpoint-{step}"
        assert time.monotonic() < deadline, f"no checkpoint-{step} after {timeout} s"
        time.sleep(0.002)
    time.sleep(delay)
    assert run.poll() is None, "the run ended before the signal"
    os.killpg(run.pid, signum)
    return run.wait(timeout)


def _run_log(folder):
    """The records of log.jsonl in `folder`."""
    import json
    import os
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _logged_losses(folder):
    """log.jsonl without its timing fields: the numbers a resumed run must repeat."""
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "step_time_s")} for r in _run_log(folder)]


def _printed_warnings(err_file):
    """The RuntimeWarning messages a run printed on stderr (a pathlib.Path)."""
    import re
    return re.findall(r"RuntimeWarning: (.*)", err_file.read_text())


def _small_filesystem_works():
    """Whether this user may mount a tmpfs in a new user + mount namespace (`unshare -rm`)."""
    import shutil
    import subprocess
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture(scope="session")
def fault_runs():
    """The fault-run helpers above as one fixture."""
    return types.SimpleNamespace(Zygote=Zygote, config=_fault_config, argv=_pretrain_argv, newest_step=_newest_step,
                                 signal_at=_signal_at, log=_run_log, losses=_logged_losses,
                                 warnings=_printed_warnings)
