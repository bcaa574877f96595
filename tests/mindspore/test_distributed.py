"""MindSpore distributed helpers, and two CPU workers under msrun ending with identical weights."""
import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ms = pytest.importorskip("mindspore")

from localmim.backends.mindspore import checkpoint as ckpt  # noqa: E402
from localmim.backends.mindspore import data as data_mod  # noqa: E402
from localmim.backends.mindspore import distributed as dist_utils  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "msrun_worker.py")


def test_single_process_is_rank_zero_of_one(monkeypatch):
    for k in ("MS_ROLE", "MS_WORKER_NUM", "MS_SCHED_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not dist_utils.launched_by_msrun()
    assert dist_utils.init_distributed("cpu") == (0, 1, "CPU")
    assert dist_utils.is_main() and not dist_utils.is_distributed()
    np.testing.assert_array_equal(dist_utils.all_reduce_mean(np.array([1.5, 2.0])), [1.5, 2.0])
    dist_utils.barrier()
    dist_utils.cleanup()


def test_device_errors_are_one_sentence():
    with pytest.raises(ValueError, match="wheels support Ascend and CPU only"):
        dist_utils.select_device("cuda")
    with pytest.raises(ValueError, match="train.device 'tpu' must be one of auto, cpu, ascend"):
        dist_utils.select_device("tpu")
    if not dist_utils.ascend_available():
        with pytest.raises(RuntimeError, match="no usable Ascend NPU"):
            dist_utils.select_device("ascend")
        assert dist_utils.select_device("auto") == "CPU"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_msrun_two_cpu_workers_end_with_identical_weights(tmp_path):
    bindir = os.path.dirname(sys.executable)
    msrun = shutil.which("msrun", path=bindir) or shutil.which("msrun")
    if msrun is None:
        pytest.skip("msrun is not installed next to this Python")
    data_dir = tmp_path / "data"
    os.makedirs(data_dir)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(data_dir / f"i{i:02d}.png")
    # each rank trains on its own shard: the identical end weights come from the gradient all-reduce
    s0, s1 = (data_mod.ShardedBatchSampler(16, 4, seed=3, rank=r, world=2) for r in (0, 1))
    assert not set(s0.rank_indices(0)) & set(s1.rank_indices(0))

    out, weights, logs = tmp_path / "out", tmp_path / "weights", tmp_path / "logs"
    env = dict(os.environ)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # msrun spawns `python` from PATH
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={logs}", "--join=True", "--cluster_time_out=120",
           WORKER, str(data_dir), str(out), str(weights), "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    worker_logs = ""
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        with open(logs / name, errors="replace") as f:
            worker_logs += f"--- {name}\n" + "\n".join(f.read().splitlines()[-15:]) + "\n"
    assert proc.returncode == 0, f"msrun failed ({proc.returncode}):\n{proc.stderr[-2000:]}\n{worker_logs}"

    w0, w1 = np.load(weights / "rank0.npz"), np.load(weights / "rank1.npz")
    assert sorted(w0.files) == sorted(w1.files)
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    # rank 0 alone wrote the outputs, and its checkpoint holds the trained weights
    assert sorted(os.listdir(out)) == ["checkpoint-2.ckpt", "config.yaml", "log.jsonl"]
    payload = ckpt.load_checkpoint(str(out / "checkpoint-2.ckpt"))
    assert payload["step"] == 2
    for k in w0.files:
        np.testing.assert_array_equal(payload["model"][k], w0[k], err_msg=k)
    with open(out / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == [1, 2]
    # images_per_s counts both ranks: batch 4 x 2 workers per step
    assert all(r["images_per_s"] > 0 and np.isfinite(r["loss"]) for r in log)


def test_msrun_ranks_stop_at_one_step_on_sigterm(tmp_path):
    """SIGTERM to rank 1 only: both ranks agree (an all-reduce after every step on CPU) to stop
    after the same step; rank 0 writes that step's checkpoint and both exit with 75."""
    bindir = os.path.dirname(sys.executable)
    msrun = shutil.which("msrun", path=bindir) or shutil.which("msrun")
    if msrun is None:
        pytest.skip("msrun is not installed next to this Python")
    data_dir, out, weights, logs, pids = (tmp_path / n for n in ("data", "out", "weights", "logs", "pids"))
    for folder in (data_dir, pids):
        os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(data_dir / f"i{i:02d}.png")
    env = dict(os.environ, LOCALMIM_TEST_PIDS=str(pids))
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={logs}", "--join=True", "--cluster_time_out=120",
           WORKER, str(data_dir), str(out), str(weights), "40"]
    with open(tmp_path / "msrun.err", "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=str(tmp_path))
    deadline = time.monotonic() + 400

    def steps():
        path = out / "log.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")] \
            if path.exists() else []

    while not (len(steps()) >= 2 and (pids / "rank1.pid").exists()):
        assert proc.poll() is None and time.monotonic() < deadline, "msrun ended or stalled before two steps"
        time.sleep(0.05)
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode != 0                                    # msrun reports its workers' status
    stopped = [int((pids / f"rank{r}.stopped").read_text()) for r in (0, 1)]
    step = stopped[0]
    assert stopped == [step, step] and 2 <= step < 40
    assert sorted(os.listdir(out)) == [f"checkpoint-{step}.ckpt", "config.yaml", "log.jsonl"]
    assert ckpt.load_checkpoint(str(out / f"checkpoint-{step}.ckpt"))["step"] == step
    assert steps()[-1] == step


def _msrun_job(tmp_path, steps, model, cluster_time_out=30, env_extra=None):
    """Start WORKER under msrun with two CPU workers on 16 noise images -> (Popen, out, weights, logs)."""
    bindir = os.path.dirname(sys.executable)
    msrun = shutil.which("msrun", path=bindir) or shutil.which("msrun")
    if msrun is None:
        pytest.skip("msrun is not installed next to this Python")
    data_dir, out, weights, logs = (tmp_path / n for n in ("data", "out", "weights", "logs"))
    os.makedirs(data_dir)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data_dir / f"i{i:02d}.png")
    env = dict(os.environ, **(env_extra or {}))
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # msrun spawns `python` from PATH
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={logs}", "--join=True", f"--cluster_time_out={cluster_time_out}",
           WORKER, str(data_dir), str(out), str(weights), str(steps), model]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(tmp_path))
    return proc, out, weights, logs


def test_msrun_swin_two_cpu_workers_end_with_identical_weights(tmp_path):
    proc, out, weights, logs = _msrun_job(tmp_path, 2, "swin_tiny_test")
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, f"msrun failed ({proc.returncode}):\n{output[-3000:]}"
    w0, w1 = np.load(weights / "rank0.npz"), np.load(weights / "rank1.npz")
    assert sorted(w0.files) == sorted(w1.files) and any(k.startswith("encoder.layers.") for k in w0.files)
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    payload = ckpt.load_checkpoint(str(out / "checkpoint-2.ckpt"))
    assert payload["step"] == 2
    for k in w0.files:
        np.testing.assert_array_equal(payload["model"][k], w0[k], err_msg=k)


def test_msrun_a_worker_that_dies_ends_the_job_within_a_minute(tmp_path):
    """Rank 1 SIGKILLs itself after its first step: msrun ends the job (non-zero) within a minute of
    that and says which worker failed."""
    proc, out, weights, logs = _msrun_job(tmp_path, 40, "vit_tiny_test", env_extra={"LOCALMIM_TEST_DIE": "1:1"})
    output = proc.communicate(timeout=300)[0]
    ended = time.time()
    died = float((weights / "rank1.died").read_text())
    assert proc.returncode != 0 and ended - died < 60, (proc.returncode, ended - died)
    assert re.search(r"(?i)worker.*(exit|fail|abnormal)|(exit|fail).*worker", output), output[-3000:]
    assert not (weights / "rank0.npz").exists()  # rank 0 did not finish its 40 steps alone
