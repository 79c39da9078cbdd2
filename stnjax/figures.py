"""Figures from a workdir (matplotlib Agg + pillow; no JAX needed).

* `transformer_grid`: a fixed test batch (top) and the transformer output on
  it (below; one row per transformer) at the final eval step;
* `transformer_gif`: the same grid at every eval step, as an animated GIF;
* `learning_curves`: train loss, validation and test error against steps.

Reads `metrics.jsonl` and `st_outputs/` written by `stnjax.train` (through
`stnjax.workdir`):
`inputs.npy` `(N, H, W, C)` in [0, 1], `step_XXXXXXXX.npy`
`(N, num_transformers, H, W, C)`. Channels are shown side by side.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import ImageDraw  # pylint: disable=g-import-not-at-top,wrong-import-position

from stnjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def load_metrics(workdir: str) -> list[dict]:
  """The lines of `metrics.jsonl` (`stnjax.workdir.read_metrics`)."""
  return workdir_lib.read_metrics(workdir)


def st_snapshots(workdir: str) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
  """`(inputs, [(step, outputs), ...])` sorted by step; raises if there are none."""
  d = workdir_lib.st_outputs_dir(workdir)
  files = workdir_lib.snapshot_steps(workdir)
  if not files:
    raise FileNotFoundError(f"No transformer snapshots in {d} (is the model an ST model?).")
  inputs = np.load(os.path.join(d, "inputs.npy"))
  return inputs, [(step, np.load(path)) for step, path in files]


def _tile(inputs: np.ndarray, outputs: np.ndarray, pad: int = 2) -> np.ndarray:
  """Rows: inputs, then each transformer's outputs; channels side by side. Values in [0, 1]."""
  rows = [inputs] + [outputs[:, t] for t in range(outputs.shape[1])]
  n, h, w, c = inputs.shape
  cell_w = c * w + (c - 1) * pad
  canvas = np.ones((len(rows) * (h + pad) + pad, n * (cell_w + pad) + pad), np.float32)
  for r, row in enumerate(rows):
    for i in range(n):
      for ch in range(c):
        y0, x0 = pad + r * (h + pad), pad + i * (cell_w + pad) + ch * (w + pad)
        canvas[y0:y0 + h, x0:x0 + w] = np.clip(row[i, :, :, ch], 0, 1)
  return canvas


def transformer_grid(workdir: str, path: str, *, step: int | None = None) -> str:
  """Input vs transformer output for the fixed test batch (last snapshot by default)."""
  inputs, steps = st_snapshots(workdir)
  by_step = dict(steps)
  if step is not None and step not in by_step:
    raise ValueError(f"`step` {step} has no snapshot; available: {sorted(by_step)}.")
  chosen = steps[-1] if step is None else (step, by_step[step])
  canvas = _tile(inputs, chosen[1])
  fig, ax = plt.subplots(figsize=(max(4, canvas.shape[1] / 40), max(2, canvas.shape[0] / 40)))
  ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  ax.set_axis_off()
  ax.set_title(f"top: input; below: transformer output (step {chosen[0]})")
  fig.savefig(path, bbox_inches="tight", dpi=100)
  plt.close(fig)
  return path


def transformer_gif(workdir: str, path: str, *, scale: int = 3, ms_per_frame: int = 500) -> str:
  """Animated GIF of the transformer outputs across training (one frame per eval step)."""
  inputs, steps = st_snapshots(workdir)
  frames = []
  for step, outputs in steps:
    canvas = (255 * _tile(inputs, outputs)).astype(np.uint8)
    image = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                           Image.NEAREST)
    framed = Image.new("L", (image.width, image.height + 14), 255)
    framed.paste(image, (0, 14))
    ImageDraw.Draw(framed).text((2, 1), f"step {step}", fill=0)
    frames.append(framed)
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
  return path


def learning_curves(workdir: str, path: str) -> str:
  """Train loss (left) and validation / test error in % (right) against steps."""
  metrics = load_metrics(workdir)
  train = [(m["step"], m["train/loss"]) for m in metrics if "train/loss" in m]
  evals = [m for m in metrics if "test/error" in m]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
  if train:
    ax1.plot(*zip(*train))
  ax1.set(xlabel="step", ylabel="train loss", yscale="log", title="training loss")
  for split in ("validation", "test"):
    ax2.plot([m["step"] for m in evals], [m[f"{split}/error"] for m in evals], "o-", label=split)
  ax2.set(xlabel="step", ylabel="error (%)", yscale="log", title="error")
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_all(workdir: str, out_dir: str | None = None) -> list[str]:
  """All figures of `workdir` into `out_dir` (default `<workdir>/figures`)."""
  out_dir = out_dir or os.path.join(workdir, "figures")
  os.makedirs(out_dir, exist_ok=True)
  paths = [learning_curves(workdir, os.path.join(out_dir, "learning_curves.png"))]
  if workdir_lib.snapshot_steps(workdir):
    paths.append(transformer_grid(workdir, os.path.join(out_dir, "transformer_grid.png")))
    paths.append(transformer_gif(workdir, os.path.join(out_dir, "transformer.gif")))
  return paths
