"""TensorBoard event files of a training run, without torch, TensorFlow or tensorboardX.

`train.tensorboard: true` makes rank 0 write `<output_dir>/tensorboard/events.out.tfevents.*`:
every log.jsonl line as scalars (tags = its keys: loss, loss_b0.., lr, images_per_s, step_time_s;
x = the optimizer step) and, every `train.tensorboard_images_every_epochs` epochs and at the end,
the reconstruction figure of `localmim visualize` (tag "reconstruction") when the engine hands the
loop a figure hook. View with `tensorboard --logdir <output_dir>/tensorboard`.

The events go through the `tensorboard` package's own EventFileWriter and protocol buffers (it
imports neither TensorFlow nor a training framework), so both backends write the same files. A
resumed run starts its event file with a SessionLog START at its first new step: TensorBoard then
drops the steps an interrupted run had logged past the checkpoint it resumed from, as
log.jsonl is trimmed. This module imports numpy and PIL (for PNG encoding) and, on use, tensorboard.
"""
from __future__ import annotations

import io
import os
import time
from typing import Mapping

import numpy as np

__all__ = ["TENSORBOARD_DIR", "SKIPPED_KEYS", "TensorBoardUnavailable", "TensorBoardWriter", "encode_png"]

TENSORBOARD_DIR = "tensorboard"
SKIPPED_KEYS = frozenset({"step", "epoch"})     # log.jsonl keys that are not scalars over steps
MISSING = ("train.tensorboard is true but the 'tensorboard' package is not installed; "
           "run: pip install 'localmim[tensorboard]' (or set train.tensorboard=false)")


class TensorBoardUnavailable(ValueError):
    """train.tensorboard asks for event files but the tensorboard package is missing (a config error)."""


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"a TensorBoard image must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class TensorBoardWriter:
    """One event file in `log_dir` (created if missing).

    start_step: optimizer steps already done (a resumed run); > 0 writes a SessionLog START at
    start_step + 1 so that TensorBoard forgets later steps of older event files.
    """

    def __init__(self, log_dir: str, start_step: int = 0):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            raise TensorBoardUnavailable(MISSING) from None
        self._event, self._summary = event_pb2, summary_pb2
        self.log_dir = log_dir
        os.makedirs(log_dir, exist_ok=True)
        self._writer = EventFileWriter(log_dir, flush_secs=30)
        if start_step > 0:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._add(int(start_step) + 1, session_log=start)

    def _add(self, step: int, **fields) -> None:
        self._writer.add_event(self._event.Event(wall_time=time.time(), step=int(step), **fields))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One scalar per key of `values` (log.jsonl's record; step and epoch are skipped)."""
        value = [self._summary.Summary.Value(tag=k, simple_value=float(v))
                 for k, v in values.items() if k not in SKIPPED_KEYS]
        self._add(step, summary=self._summary.Summary(value=value))

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 RGB image under `tag` at `step`."""
        arr = np.asarray(image)
        encoded = encode_png(arr)
        img = self._summary.Summary.Image(height=arr.shape[0], width=arr.shape[1], colorspace=3,
                                          encoded_image_string=encoded)
        self._add(step, summary=self._summary.Summary(value=[self._summary.Summary.Value(tag=tag, image=img)]))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
