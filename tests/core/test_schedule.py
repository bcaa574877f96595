"""lr scaling and the warmup + cosine schedule (docs/method.md#lr-schedule)."""
import math

import pytest

from localmim.core.schedule import lr_at, lr_for_step, scaled_lr


def test_scaled_lr_reference_recipes():
    assert scaled_lr(2e-4, 2048) == pytest.approx(1.6e-3)    # ViT-B
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # ViT-L
    assert scaled_lr(1e-4, 2048) == pytest.approx(8e-4)      # Swin-B


@pytest.mark.parametrize("t, expected", [
    (0.0, 0.0),
    (10.0, 1e-3 * 10 / 40),
    (40.0, 1e-3),                              # warmup end
    (40.0 + 180.0, (1e-3 + 1e-5) / 2),         # cosine midpoint
    (400.0, 1e-5),                             # end: min_lr
    (450.0, 1e-5),                             # past the end stays at min_lr
])
def test_lr_at_landmarks(t, expected):
    got = lr_at(t, lr=1e-3, min_lr=1e-5, warmup_epochs=40, epochs=400)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_at_quarter_point_by_hand():
    # a quarter into the cosine: 0.5 * (1 + cos(pi / 4))
    expected = 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_at(25.0, 1.0, 0.0, 0, 100) == pytest.approx(expected)


def test_lr_at_without_warmup_starts_at_peak():
    assert lr_at(0.0, 2e-3, 1e-6, 0, 100) == pytest.approx(2e-3)
    assert lr_at(100.0, 2e-3, 1e-6, 0, 100) == pytest.approx(1e-6)


def test_lr_for_step_uses_fractional_epochs():
    assert lr_for_step(0, 625, 1.6e-3, 1e-6, 40, 1600) == 0.0
    assert lr_for_step(625 * 40, 625, 1.6e-3, 1e-6, 40, 1600) == pytest.approx(1.6e-3)
    expected = 1.6e-3 * (20 + 100 / 625) / 40
    assert lr_for_step(625 * 20 + 100, 625, 1.6e-3, 1e-6, 40, 1600) == pytest.approx(expected)


def test_lr_for_step_equals_reference_per_iteration_schedule_with_accumulation():
    iters, accum, lr, min_lr, warmup, epochs = 12, 3, 1e-3, 1e-6, 2, 5
    opt_step = 0
    for epoch in range(epochs):
        for it in range(iters):
            if it % accum == 0:   # the reference sets the lr at t = epoch + it / iters
                reference = lr_at(epoch + it / iters, lr, min_lr, warmup, epochs)
                got = lr_for_step(opt_step, iters // accum, lr, min_lr, warmup, epochs)
                assert got == pytest.approx(reference)
            if (it + 1) % accum == 0:
                opt_step += 1


@pytest.mark.parametrize("call, message", [
    (lambda: lr_at(1.0, 1e-3, 0.0, 10, 10), r"epochs \(10.0\) must be greater than warmup_epochs \(10.0\)"),
    (lambda: lr_at(-1.0, 1e-3, 0.0, 1, 10), "time t_epochs must be a finite non-negative number"),
    (lambda: lr_at(1.0, float("nan"), 0.0, 1, 10), "lr must be a finite non-negative number"),
    (lambda: lr_for_step(3, 0, 1e-3, 0.0, 1, 10), "steps_per_epoch must be a positive integer, got 0"),
    (lambda: lr_for_step(-1, 5, 1e-3, 0.0, 1, 10), "optimizer step must be a non-negative integer"),
    (lambda: scaled_lr(1e-4, 0), "effective batch size must be a positive integer, got 0"),
])
def test_schedule_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
