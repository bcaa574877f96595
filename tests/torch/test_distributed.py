"""Distributed helpers and a 2-process DDP run (gloo, CPU) against one process on the global batch."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from localmim.backends.torch import data, distributed, engine
from localmim.backends.torch import build_model
from localmim.core import schedule
from localmim.core.config import config_from_dict

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")


def test_single_process_helpers(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    rank, world, local_rank, device = distributed.init_distributed("cpu")
    assert (rank, world, local_rank, device) == (0, 1, 0, torch.device("cpu"))
    assert not distributed.is_distributed() and distributed.is_main()
    assert distributed.get_world_size() == 1
    x = torch.tensor([1.0, 3.0])
    y = distributed.all_reduce_mean(x)
    assert torch.equal(y, x) and y is not x
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.barrier()
    distributed.cleanup()
    with pytest.raises(ValueError, match="'ascend'"):
        distributed.select_device("ascend")
    if not torch.cuda.is_available():
        assert distributed.select_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            distributed.select_device("cuda")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_dict(image_dir, out):
    return {
        "model": {"name": "vit_tiny_test"},
        "data": {"path": image_dir, "batch_size": 2, "num_workers": 0},
        "optim": {"blr": 0.1, "epochs": 10, "warmup_epochs": 1, "accum_iter": 2},
        "train": {"output_dir": out, "max_steps": 3, "log_every": 1, "save_every_steps": 100,
                  "progress": False, "seed": 4, "device": "cpu"},
    }


def _reference_run(cfg, world: int, steps: int):
    """One process, one model, each step on the concatenated micro-batches of every rank."""
    spec = cfg.build_spec()
    torch.manual_seed(cfg.train.seed)
    model = build_model(spec)
    opt = engine.build_optimizer(model, cfg)
    loaders = [data.build_pretrain_loader(cfg, spec, rank=r, world=world) for r in range(world)]
    accum = cfg.optim.accum_iter
    steps_per_epoch = loaders[0][1].batches_per_epoch // accum
    base_lr = cfg.resolved_lr(world)
    losses = []
    assert base_lr == pytest.approx(0.1 * 2 * 2 * world / 256)
    for step in range(steps):
        first = (step % steps_per_epoch) * accum
        batches = []
        for loader, sampler in loaders:
            sampler.set_epoch(step // steps_per_epoch, first, first + accum)
            batches += list(loader)
        images = torch.cat([b["images"] for b in batches])
        masks = {k: torch.cat([b["masks"][k] for b in batches]) for k in batches[0]["masks"]}
        engine.set_lr(opt, schedule.lr_for_step(step, steps_per_epoch, base_lr, cfg.optim.min_lr,
                                                cfg.optim.warmup_epochs, cfg.optim.epochs))
        loss, _ = model(images, masks)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.state_dict(), losses


def _write_images(image_dir, n=16):
    image_dir.mkdir()
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (34 + i, 38, 3), dtype=np.uint8)).save(image_dir / f"{i:02d}.png")
    return str(image_dir)


def _torchrun_command(tmp_path, cfg_dict, out, **env_extra):
    """(argv, env) of torchrun running ddp_worker.py on 2 gloo ranks."""
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg_dict))
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", WORKER, str(cfg_path), str(out)]
    return cmd, env


def _torchrun(tmp_path, cfg_dict, out):
    """Run ddp_worker.py on 2 gloo ranks; returns (rank0 state, rank1 state), asserted identical."""
    cmd, env = _torchrun_command(tmp_path, cfg_dict, out)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = torch.load(out / "rank0.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    return rank0, rank1


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_ddp_swin_ranks_end_identical_and_checkpoint_them(tmp_path):
    out = tmp_path / "ddp_swin"
    out.mkdir()
    cfg_dict = _config_dict(_write_images(tmp_path / "imgs"), str(out))
    cfg_dict["model"] = {"name": "swin_tiny_test"}
    cfg_dict["optim"]["accum_iter"] = 1
    cfg_dict["train"]["max_steps"] = 2
    rank0, _ = _torchrun(tmp_path, cfg_dict, out)
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 2
    saved = torch.load(result["checkpoint"], weights_only=True)
    assert all(torch.equal(saved["model"][k], rank0[k]) for k in rank0)
    assert any(k.startswith("encoder.layers.") for k in rank0)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    cfg_dict = _config_dict(_write_images(tmp_path / "imgs"), str(out))
    rank0, _ = _torchrun(tmp_path, cfg_dict, out)
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 3
    saved = torch.load(result["checkpoint"], weights_only=True)
    assert all(torch.equal(saved["model"][k], rank0[k]) for k in rank0)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0]["images_per_s"] > 0

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref, ref_losses = _reference_run(config_from_dict(cfg_dict), world=2, steps=3)
        cfg_lr = config_from_dict(cfg_dict).resolved_lr(2)
    finally:
        torch.set_num_threads(before)
    torch.manual_seed(4)
    init = build_model(config_from_dict(cfg_dict).build_spec()).state_dict()
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 1e-3  # the three steps really changed the weights
    assert [r["loss"] for r in log] == pytest.approx(ref_losses, rel=1e-5)
    # The key bias of every attention block gets an exactly zero gradient in exact arithmetic (softmax
    # is shift invariant), so its computed gradient is rounding noise that Adam normalises to steps of
    # up to ~lr: it is compared against that bound, everything else within 1e-5.
    lr_sum = sum(schedule.lr_for_step(s, 2, cfg_lr, 1e-6, 1, 10) for s in range(3))
    for k in ref:
        a, b = rank0[k].clone(), ref[k].clone()
        if k.endswith("attn.qkv.bias"):
            n = a.numel() // 3
            assert (a[n:2 * n] - b[n:2 * n]).abs().max().item() <= 2 * lr_sum, k
            a[n:2 * n] = b[n:2 * n]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=k)


def _wait_for(condition, proc, what, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"torchrun ended ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _logged_steps(out):
    if not (out / "log.jsonl").exists():
        return []
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if line.endswith("}")]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_ranks_stop_at_one_step_on_sigterm_and_a_dead_rank_ends_the_job(tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step, rank 0 writes its checkpoint,
    both exit with 75. Resumed, then rank 1 killed: torchrun ends the job within seconds (gloo's
    closed connection, torchrun's own monitor) and the checkpoint stays intact."""
    out, pids = tmp_path / "out", tmp_path / "pids"
    out.mkdir()
    pids.mkdir()
    cfg_dict = _config_dict(_write_images(tmp_path / "imgs"), str(out))
    cfg_dict["optim"]["accum_iter"] = 1
    cfg_dict["train"]["max_steps"] = 40
    cmd, env = _torchrun_command(tmp_path, cfg_dict, out, LOCALMIM_TEST_PIDS=str(pids))

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "run1.err", "w"))
    _wait_for(lambda: len(_logged_steps(out)) >= 2 and (pids / "rank1.pid").exists(), proc, "two steps")
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode != 0                                    # torchrun reports its workers' status
    stopped = [int((pids / f"rank{r}.stopped").read_text()) for r in (0, 1)]
    step = stopped[0]
    assert stopped == [step, step] and 2 <= step < 40              # one step for both ranks
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{step}.pth"]
    assert torch.load(out / f"checkpoint-{step}.pth", weights_only=True)["step"] == step
    assert _logged_steps(out)[-1] == step

    for f in pids.iterdir():
        f.unlink()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "run2.err", "w"))
    _wait_for(lambda: any(s > step + 1 for s in _logged_steps(out)) and (pids / "rank1.pid").exists(), proc,
              "the resumed run's steps")
    killed = time.monotonic()
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)
    proc.wait(timeout=120)
    ended = time.monotonic() - killed
    assert proc.returncode != 0 and ended < 60, ended
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".tmp-"))) == \
        [f"checkpoint-{step}.pth"]
    assert torch.load(out / f"checkpoint-{step}.pth", weights_only=True)["step"] == step
