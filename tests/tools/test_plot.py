"""tools.plot (`localmim plot RUN_DIR`): loss.png from a small log.jsonl, one line per branch."""
import json

import numpy as np
import pytest
from PIL import Image

from localmim.tools import cli, plot

pytest.importorskip("matplotlib")


def _write_log(folder, rows, torn=True):
    with open(folder / "log.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if torn:
            f.write('{"step": 70, "loss"')                        # a killed run's last line


def _pretrain_rows():
    rows = []
    for s in range(10, 70, 10):
        row = {"step": s, "epoch": s // 7, "loss": 4.0 / s, "lr": 1e-3 * min(1.0, s / 30), "images_per_s": 30.0}
        row.update({f"loss_b{k}": (k + 1) / s for k in range(4)})
        rows.append(row)
    return rows


def test_plot_draws_the_total_every_branch_and_the_lr(tmp_path, capsys):
    rows = _pretrain_rows()
    _write_log(tmp_path, rows)
    code = cli.main(["plot", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    png = tmp_path / "loss.png"
    assert out.strip() == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (700, 520)          # 7 x 2.6 in per panel at 100 dpi, 2 panels
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50       # lines and text were drawn

    fig = plot.loss_figure(plot.read_log(str(tmp_path / "log.jsonl")))
    loss_ax, lr_ax = fig.axes
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert list(lines) == ["loss", "loss_b0", "loss_b1", "loss_b2", "loss_b3"]
    steps = [r["step"] for r in rows]
    for key, ln in lines.items():
        np.testing.assert_array_equal(ln.get_xdata(), steps)
        np.testing.assert_allclose(ln.get_ydata(), [r[key] for r in rows])
    (lr,) = lr_ax.get_lines()
    np.testing.assert_allclose(lr.get_ydata(), [r["lr"] for r in rows])


def test_finetune_columns_get_their_panels(tmp_path):
    rows = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, **({"val_acc1": 10.0 * s, "val_acc5": 20.0 * s, "val_loss": 1.0 / s}
                                                         if s % 20 == 0 else {})} for s in range(10, 70, 10)]
    _write_log(tmp_path, rows, torn=False)
    fig = plot.loss_figure(plot.read_log(str(tmp_path / "log.jsonl")))
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "lr", "accuracy", "validation loss"]
    acc = {ln.get_label(): ln for ln in fig.axes[2].get_lines()}
    assert list(acc) == ["val_acc1", "val_acc5"]
    np.testing.assert_array_equal(acc["val_acc1"].get_xdata(), [20, 40, 60])          # only where present
    np.testing.assert_allclose(acc["val_acc5"].get_ydata(), [400.0, 800.0, 1200.0])
    out = plot.plot_run(str(tmp_path), str(tmp_path / "sub" / "curves.png"))
    with Image.open(out) as im:
        assert im.size == (700, 4 * 260)


def test_missing_or_empty_logs_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "has no log.jsonl" in capsys.readouterr().err
    (tmp_path / "log.jsonl").write_text('{"step"\n')
    assert cli.main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no logged step" in err and len(err.strip().splitlines()) == 1
