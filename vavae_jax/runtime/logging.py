"""Metric and image logging: TensorBoard event files + a JSONL copy, on process 0 only."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


def setup_python_logging(level=logging.INFO, *, replace: bool = False) -> None:
    """Plain log lines on stderr at `level`; absl, orbax, jax and grain only from WARNING.
    `replace`: drop root handlers set up already (importing orbax calls absl's
    logging.basicConfig() at WARNING, which would keep its format; absl-run launchers keep
    absl's handler)."""
    root = logging.getLogger()
    if replace:
        for h in list(root.handlers):
            root.removeHandler(h)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        fmt = f"%(asctime)s [p{jax.process_index()}] %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricWriter:
    """Writes scalars and images to TensorBoard and `metrics.jsonl` in `logdir` (process 0)."""

    def __init__(self, logdir):
        self.active = jax.process_index() == 0
        self.logdir = logdir
        self._tb = None
        self._jsonl = None
        if self.active:
            from tensorboardX import SummaryWriter

            from vavae_jax.runtime.checkpoint import as_path

            path = as_path(logdir)
            path.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(path), flush_secs=30)
            self._jsonl = (path / "metrics.jsonl").open("a")

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, name: str, image_hwc_uint8: np.ndarray) -> None:
        if self.active:
            self._tb.add_image(name, image_hwc_uint8, step, dataformats="HWC")

    def flush(self) -> None:
        if self.active:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.active:
            self._tb.close()
            self._jsonl.close()


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Stacks rows of images ([N, H, W, 3] in [-1, 1]) into one uint8 grid [rows*H, N*W, 3]."""
    out = []
    for r in rows:
        r = np.clip((np.asarray(r, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        out.append(np.concatenate(list(r), axis=1))
    return np.concatenate(out, axis=0)


def tile_images(images: np.ndarray, columns: int, fill: int = 0) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> one grid [rows*H, columns*W, 3], `columns` a row, the cells
    after the last image filled with `fill`."""
    n, h, w = images.shape[:3]
    rows = -(-n // columns)
    grid = np.full((rows * h, columns * w, 3), fill, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    return grid


def save_png(path, image_hwc_uint8: np.ndarray) -> None:
    from PIL import Image

    from vavae_jax.runtime.checkpoint import as_path

    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(image_hwc_uint8).save(f, format="PNG")
