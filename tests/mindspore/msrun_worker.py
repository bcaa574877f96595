"""One msrun worker for tests/mindspore/test_distributed.py (not a test module itself).

Usage (under msrun): python msrun_worker.py <data_dir> <output_dir> <weights_dir> <max_steps> [model]
Runs engine.run_pretrain on the tiny ViT (or `model`, e.g. swin_tiny_test) and saves this rank's
final weights (canonical state) to <weights_dir>/rank<r>.npz, so the test can compare ranks. With
LOCALMIM_TEST_DIE=<rank>:<step> that rank kills itself (SIGKILL) after that optimizer step,
writing the time to <weights_dir>/rank<r>.died first. With LOCALMIM_TEST_PIDS=DIR it first
writes its pid to DIR/rank<r>.pid (for tests that signal one rank), runs PyNative synchronously
(the same numbers, ~10x faster on 2 busy CPU cores), and a run stopped by a signal writes
DIR/rank<r>.stopped (the step) and exits with the CLI's status for it.
"""
import os
import sys
import time

import numpy as np


def main(data_dir: str, output_dir: str, weights_dir: str, max_steps: int, model: str = "vit_tiny_test") -> None:
    from localmim.backends import runs
    from localmim.backends.mindspore import engine
    from localmim.backends.mindspore import distributed as dist_utils
    from localmim.core.config import PretrainConfig

    pids, rank_id = os.environ.get("LOCALMIM_TEST_PIDS"), os.environ.get("RANK_ID", "0")
    if pids:
        import mindspore as ms
        ms.set_context(pynative_synchronize=True)
        with open(os.path.join(pids, f"rank{rank_id}.pid"), "w") as f:
            f.write(str(os.getpid()))

    built = []
    original = engine.build_model

    def capture(spec):  # keep a handle on the model the engine trains
        model = original(spec)
        built.append(model)
        return model

    engine.build_model = capture
    die = os.environ.get("LOCALMIM_TEST_DIE")
    if die and die.split(":")[0] == rank_id:
        import signal
        at_step, real_apply, done = int(die.split(":")[1]), engine.TrainStep.apply, []

        def apply_then_die(self):
            row = real_apply(self)
            done.append(1)
            if len(done) >= at_step:
                os.makedirs(weights_dir, exist_ok=True)
                with open(os.path.join(weights_dir, f"rank{rank_id}.died"), "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            return row
        engine.TrainStep.apply = apply_then_die
    cfg = PretrainConfig()
    cfg.train.compile = False  # PyNative: no compile time for a few tiny steps
    cfg.model.name = model
    cfg.data.path = data_dir
    cfg.data.batch_size = 4
    cfg.data.num_workers = 0
    cfg.optim.lr = 1e-3
    cfg.optim.epochs = 4
    cfg.optim.warmup_epochs = 0
    cfg.train.seed = 3
    cfg.train.device = "cpu"
    cfg.train.output_dir = output_dir
    cfg.train.max_steps = max_steps
    cfg.train.log_every = 1
    cfg.train.progress = False
    try:
        result = engine.run_pretrain(cfg)
    except runs.Preempted as stopped:
        with open(os.path.join(pids or output_dir, f"rank{rank_id}.stopped"), "w") as f:
            f.write(str(stopped.step))
        sys.exit(stopped.exit_status)
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    os.makedirs(weights_dir, exist_ok=True)
    np.savez(os.path.join(weights_dir, f"rank{rank}.npz"), **built[-1].export_state())
    print(f"worker rank {rank} of {world} done: step {result['step']} loss {result['loss']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:6])
