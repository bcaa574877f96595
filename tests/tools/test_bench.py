"""`localmim bench`: it runs the engine's TrainStep for both families, and its FLOPs count (the MFU
numerator) agrees with torch's own FLOP counter on the real forward + backward."""
import json

import pytest

torch = pytest.importorskip("torch")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from localmim.backends.torch import build_model  # noqa: E402
from localmim.core import masking  # noqa: E402
from localmim.core.specs import get_spec  # noqa: E402
from localmim.tools import bench  # noqa: E402


@pytest.mark.parametrize("model", ["vit_tiny_test", "swin_tiny_test"])
def test_bench_prints_one_json_line_with_throughput(capsys, monkeypatch, model):
    from localmim.backends.torch import engine
    applied = []
    real_apply = engine.TrainStep.apply
    monkeypatch.setattr(engine.TrainStep, "apply", lambda self: applied.append(1) or real_apply(self))
    assert bench.main(["--model", model, "--batch", "2", "--steps", "2", "--warmup", "1",
                       "--precision", "fp32", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == model and result["backend"] == "torch"
    assert result["images_per_s"] > 0 and result["step_time_s"] > 0
    assert result["loss"] == result["loss"]  # finite number, not NaN
    assert len(applied) == 3  # warmup + timed steps all went through the engine's TrainStep


def test_vit_flops_match_torch_flop_counter():
    spec, batch = get_spec("vit_demo"), 2
    model = build_model(spec)
    m = masking.vit_mask(masking.mask_rng(0, 0, 0, 0), batch, spec.num_patches, 0.75)
    images = torch.randn(batch, 3, spec.img_size, spec.img_size)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(images, {k: torch.from_numpy(v) for k, v in m.as_dict().items()})
        loss.backward()
    ratio = bench.vit_train_flops(spec, batch, 0.75) / counter.get_total_flops()
    # 3x forward slightly over-counts: the patch embedding needs no input gradient.
    assert 1.0 <= ratio <= 1.08, ratio
