"""MindSpore distributed helpers, and two CPU workers under msrun ending with identical weights."""
import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
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


def _noise_images(folder, size):
    """16 uniform-noise RGB PNGs of size x size px in a new `folder`."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"i{i:02d}.png")


class MsrunJob:
    """WORKER under msrun with two CPU workers on 16 noise images of `image_size` px, started in
    the background in `root` (data, out, weights, logs, pids folders; msrun's own output in
    msrun.out). `ended` is the time.time() of msrun's exit, taken by a thread that waits for it."""

    def __init__(self, root, steps, model="vit_tiny_test", image_size=64, env_extra=None):
        bindir = os.path.dirname(sys.executable)
        msrun = shutil.which("msrun", path=bindir) or shutil.which("msrun")
        if msrun is None:
            pytest.skip("msrun is not installed next to this Python")
        self.root = root
        self.data, self.out, self.weights, self.logs, self.pids = (root / n for n in
                                                                   ("data", "out", "weights", "logs", "pids"))
        _noise_images(self.data, image_size)
        os.makedirs(self.pids)
        env = dict(os.environ, **(env_extra or {}))
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # msrun spawns `python` from PATH
        # the cluster may take long to form while other jobs start beside it; a worker lost later is
        # found by msrun's heartbeats (MS_NODE_TIMEOUT), whatever this timeout is
        cmd = [msrun, "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
               f"--log_dir={self.logs}", "--join=True", "--cluster_time_out=120",
               WORKER, str(self.data), str(self.out), str(self.weights), str(steps), model]
        with open(root / "msrun.out", "w") as output:  # a file, not a pipe: nobody reads it while it runs
            self.proc = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT, cwd=str(root),
                                         start_new_session=True)
        self.ended = None
        self._waiter = threading.Thread(target=self._wait_for_exit, daemon=True)
        self._waiter.start()

    def _wait_for_exit(self):
        self.proc.wait()
        self.ended = time.time()

    def running(self):
        return self.ended is None

    def result(self, timeout=600.0):
        """Wait for msrun to end -> (exit code, its output and the tail of every worker log)."""
        self._waiter.join(timeout)
        assert not self._waiter.is_alive(), f"msrun still running after {timeout} s"
        text = (self.root / "msrun.out").read_text(errors="replace")
        for name in sorted(os.listdir(self.logs)) if os.path.isdir(self.logs) else []:
            with open(self.logs / name, errors="replace") as f:
                text += f"\n--- {name}\n" + "\n".join(f.read().splitlines()[-15:])
        return self.proc.returncode, text

    def stop(self):
        """Kill msrun and its workers if they still run (a test that failed before waiting)."""
        if self.running():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self._waiter.join(60)


@pytest.fixture(scope="module")
def msrun_jobs(tmp_path_factory):
    """The three jobs whose end the tests check, started together: on 2 cores they wait much of
    their time (cluster set-up, msrun's heartbeat timeout for a dead worker, shutdown polls), so
    running side by side takes about as long as the longest alone.
    vit: 2 steps of vit_tiny_test on 36 px images; swin: 2 steps of swin_tiny_test; die: rank 1
    SIGKILLs itself after its first step of 40."""
    root = tmp_path_factory.mktemp("msrun")
    jobs = {}
    try:
        jobs["die"] = MsrunJob(root / "die", 40, "vit_tiny_test", env_extra={"LOCALMIM_TEST_DIE": "1:1"})
        jobs["vit"] = MsrunJob(root / "vit", 2, "vit_tiny_test", image_size=36)
        jobs["swin"] = MsrunJob(root / "swin", 2, "swin_tiny_test")
        yield jobs
    finally:
        for job in jobs.values():
            job.stop()


def test_msrun_two_cpu_workers_end_with_identical_weights(msrun_jobs):
    # each rank trains on its own shard: the identical end weights come from the gradient all-reduce
    s0, s1 = (data_mod.ShardedBatchSampler(16, 4, seed=3, rank=r, world=2) for r in (0, 1))
    assert not set(s0.rank_indices(0)) & set(s1.rank_indices(0))

    job = msrun_jobs["vit"]
    code, output = job.result()
    assert code == 0, f"msrun failed ({code}):\n{output[-4000:]}"
    out, weights = job.out, job.weights
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
    job = MsrunJob(tmp_path, 40, "vit_tiny_test", image_size=36,
                   env_extra={"LOCALMIM_TEST_PIDS": str(tmp_path / "pids")})
    out, pids = job.out, job.pids
    deadline = time.monotonic() + 400

    def steps():
        path = out / "log.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")] \
            if path.exists() else []

    try:
        while not (len(steps()) >= 2 and (pids / "rank1.pid").exists()):
            assert job.running() and time.monotonic() < deadline, "msrun ended or stalled before two steps"
            time.sleep(0.05)
        os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
        code, output = job.result(300)
    finally:
        job.stop()
    assert code != 0                                               # msrun reports its workers' status
    stopped = [int((pids / f"rank{r}.stopped").read_text()) for r in (0, 1)]
    step = stopped[0]
    assert stopped == [step, step] and 2 <= step < 40
    assert sorted(os.listdir(out)) == [f"checkpoint-{step}.ckpt", "config.yaml", "log.jsonl"]
    assert ckpt.load_checkpoint(str(out / f"checkpoint-{step}.ckpt"))["step"] == step
    assert steps()[-1] == step


def test_msrun_swin_two_cpu_workers_end_with_identical_weights(msrun_jobs):
    job = msrun_jobs["swin"]
    code, output = job.result()
    assert code == 0, f"msrun failed ({code}):\n{output[-4000:]}"
    w0, w1 = np.load(job.weights / "rank0.npz"), np.load(job.weights / "rank1.npz")
    assert sorted(w0.files) == sorted(w1.files) and any(k.startswith("encoder.layers.") for k in w0.files)
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    payload = ckpt.load_checkpoint(str(job.out / "checkpoint-2.ckpt"))
    assert payload["step"] == 2
    for k in w0.files:
        np.testing.assert_array_equal(payload["model"][k], w0[k], err_msg=k)


def test_msrun_a_worker_that_dies_ends_the_job_within_a_minute(msrun_jobs):
    """Rank 1 SIGKILLs itself after its first step: msrun ends the job (non-zero) within a minute of
    that and says which worker failed."""
    job = msrun_jobs["die"]
    code, _ = job.result()
    output = (job.root / "msrun.out").read_text(errors="replace")
    died = float((job.weights / "rank1.died").read_text())
    assert code != 0 and job.ended - died < 60, (code, job.ended - died)
    assert re.search(r"(?i)worker.*(exit|fail|abnormal)|(exit|fail).*worker", output), output[-3000:]
    assert not (job.weights / "rank0.npz").exists()  # rank 0 did not finish its 40 steps alone
