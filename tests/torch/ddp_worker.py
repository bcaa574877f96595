"""torchrun entry for tests/torch/test_distributed.py: one rank of a short DDP pretraining run.

Usage: python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py CONFIG_JSON OUT_DIR
Runs engine.run_pretrain on the config (a JSON dict of config sections) and saves this rank's
final model state to OUT_DIR/rank<r>.pt so the test can check that all ranks agree. With
LOCALMIM_TEST_PIDS=DIR it first writes its pid to DIR/rank<r>.pid (for tests that signal one
rank); a run stopped by a signal writes DIR/rank<r>.stopped (the step) and exits with the CLI's
status for it.
"""
import json
import os
import sys

import torch

from localmim.backends import runs
from localmim.backends.torch import engine
from localmim.core.config import config_from_dict


def main(config_json: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    with open(config_json) as f:
        cfg = config_from_dict(json.load(f), where=config_json)
    built = []
    real_build = engine.build_model

    def capture(spec):
        built.append(real_build(spec))
        return built[-1]

    engine.build_model = capture
    rank = int(os.environ.get("RANK", "0"))
    pids = os.environ.get("LOCALMIM_TEST_PIDS")
    if pids:
        with open(os.path.join(pids, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    try:
        result = engine.run_pretrain(cfg)
    except runs.Preempted as stopped:
        with open(os.path.join(pids or out_dir, f"rank{rank}.stopped"), "w") as f:
            f.write(str(stopped.step))
        sys.exit(stopped.exit_status)
    torch.save({k: v.detach().clone() for k, v in built[0].state_dict().items()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
