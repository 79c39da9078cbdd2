"""The workdir format, read and written only through this module.

A workdir holds one run (`stnjax.train.train_and_evaluate`):

* `config.json`: the run's config as JSON, written (atomically) before the
  first step. A resume must run the same experiment: `check_resumable`
  refuses a config that differs in anything that changes the trajectory
  (data, model, optimiser, schedule, seeds), naming the fields.
* `metrics.jsonl`: one JSON object per logged step, appended. A run killed
  while appending leaves a torn last line, which `read_metrics` skips; on
  resume the lines after the last checkpoint are dropped by rewriting the
  file through a temporary file and an atomic rename, so a kill at any moment
  loses at most the lines after the last checkpoint.
* `checkpoints/`: Orbax `CheckpointManager` steps (`checkpoints/<step>/`).
* `st_outputs/`: a fixed test batch (`inputs.npy`) and the first seed's
  transformer outputs at every eval step (`step_XXXXXXXX.npy`).

`restore(workdir)` returns `(model, params, config)` ready for
`model.apply({"params": params}, images)`.
"""

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import ml_collections

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ST_OUTPUTS = "st_outputs"

# Fields that do not change the trained parameters: a resume may change them.
# `train.num_steps` only extends or shortens a run whose schedule does not
# depend on it (not "cosine").
RESUMABLE_FIELDS = frozenset({
    "train.num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "eval_batch_size", "progress", "distributed", "data.mnist_dir", "data.tfds_dir",
    "paper_error"})


class ConfigMismatchError(ValueError):
  """A workdir was written by a run whose config differs from the one given."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, METRICS)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS)


def st_outputs_dir(workdir: str) -> str:
  return os.path.join(workdir, ST_OUTPUTS)


def _atomic_write(path: str, text: str):
  """Writes `text` to `path` through `path.tmp` and `os.replace`: readers see old or new."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def config_to_dict(config: ml_collections.ConfigDict | Mapping) -> dict:
  """The JSON form of a config (what `config.json` holds)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort(sort_keys=True))
  return json.loads(json.dumps(dict(config), sort_keys=True))


def read_config(workdir: str) -> dict | None:
  """`config.json` as a dict, or None if the workdir has none."""
  path = config_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); it is written atomically, so it was "
                       f"edited by hand: restore it or use a new workdir.") from None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """`config.json` as a `ConfigDict`; raises `FileNotFoundError` naming the workdir."""
  config = read_config(workdir)
  if config is None:
    raise FileNotFoundError(f"{config_path(workdir)} does not exist: {workdir!r} is not a "
                            f"workdir written by stnjax.train.")
  return ml_collections.ConfigDict(config)


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


_MISSING = object()


def config_differences(old: Mapping, new: Mapping, *, strict: bool = False) -> list[str]:
  """Dotted names of the fields in which two config dicts differ.

  Without `strict`, only the fields that change the run: all but
  `RESUMABLE_FIELDS`, and `train.num_steps` too under a cosine schedule
  (its decay is stretched over `num_steps`).
  """
  a, b = flatten(old), flatten(new)
  diff = sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))
  if strict:
    return diff
  cosine = "cosine" in (a.get("train.lr_schedule"), b.get("train.lr_schedule"))
  return [k for k in diff if k not in RESUMABLE_FIELDS or (k == "train.num_steps" and cosine)]


def _describe(old: Mapping, new: Mapping, fields: Sequence[str]) -> str:
  a, b = flatten(old), flatten(new)
  show = lambda d, k: "(absent)" if k not in d else json.dumps(d[k])
  return ", ".join(f"{k}: {show(a, k)} -> {show(b, k)}" for k in fields)


def check_resumable(config, workdir: str, *, strict: bool = False,
                    allow_config_change: bool = False,
                    how_to_proceed: str | None = None) -> list[str]:
  """Raises `ConfigMismatchError` if `workdir` holds a run of another config.

  Args:
    config: the config about to run (`ConfigDict` or dict).
    workdir: a workdir, possibly new (then nothing is checked).
    strict: refuse any difference, not only the fields that change the run
      (`scripts/reproduce.py`: a record must describe one config).
    allow_config_change: log the differences instead of raising.
    how_to_proceed: the advice at the end of the error message.

  Returns:
    Every field that differs (those allowed included), for logging.
  """
  old = read_config(workdir)
  if old is None:
    return []
  new = config_to_dict(config)
  refused = config_differences(old, new, strict=strict)
  if refused and not allow_config_change:
    hint = how_to_proceed or (
        "Use a new --workdir, or rerun with --allow_config_change (Python: "
        "train_and_evaluate(..., allow_config_change=True)) to continue its last checkpoint "
        "under the new config (the old config.json is kept beside it)")
    raise ConfigMismatchError(
        f"{config_path(workdir)} was written by a run whose config differs in "
        f"{len(refused)} field(s) that change the run: {_describe(old, new, refused)}. "
        f"Resuming would mix two runs in one workdir. {hint}.")
  changed = config_differences(old, new, strict=True)
  if changed:
    logging.info("%s: config changes on resume: %s", workdir, _describe(old, new, changed))
  return changed


def write_config(config, workdir: str, *, resumed_at: int | None = None):
  """Writes `config.json` (atomically) unless it already holds this config.

  A changed config (allowed by `check_resumable`) replaces it; the previous
  one is kept as `config.until_step_XXXXXXXX.json`, named by the checkpoint
  step the new config continues from (`resumed_at`, 0 for none).
  """
  path = config_path(workdir)
  new = config_to_dict(config)
  old = read_config(workdir)
  if old == new:
    return
  if old is not None:
    keep = os.path.join(workdir, f"config.until_step_{resumed_at or 0:08d}.json")
    _atomic_write(keep, json.dumps(old, indent=2, sort_keys=True) + "\n")
  _atomic_write(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def _parse_metrics(path: str) -> list[dict]:
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # No newline after it: torn by a kill mid-append.
        logging.warning("%s: skipping a torn last line (%d characters).", path, len(line))
        break
      raise ValueError(f"{path}, line {i + 1}: not a JSON object ({e}). Only the last line "
                       f"can be torn by a kill; fix or delete the file.") from None
    if not isinstance(record, dict) or "step" not in record:
      raise ValueError(f"{path}, line {i + 1}: expected a JSON object with a 'step', got "
                       f"{line[:80]!r}.")
    records.append(record)
  return records


def read_metrics(workdir: str) -> list[dict]:
  """The lines of `metrics.jsonl` in file order ([] if none), a torn last line skipped."""
  path = metrics_path(workdir)
  return _parse_metrics(path) if os.path.exists(path) else []


def read_evals(workdir: str) -> list[dict]:
  """The eval lines of `metrics.jsonl` (those with `test/error`), in step order."""
  return [m for m in read_metrics(workdir) if "test/error" in m]


def truncate_metrics(workdir: str, step: int):
  """Drops the lines logged after `step` (and a torn last line), atomically.

  The kept lines go to `metrics.jsonl.tmp`, which then replaces the file: a
  kill during the rewrite leaves the old file whole.
  """
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return
  kept = [m for m in _parse_metrics(path) if m["step"] <= step]
  _atomic_write(path, "".join(json.dumps(m) + "\n" for m in kept))


class MetricsWriter:
  """Appends one JSON line per call to `metrics.jsonl` (when `enabled`: process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path, self.enabled = metrics_path(workdir), enabled

  def write(self, step: int, metrics: Mapping[str, Any]):
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), **metrics}) + "\n")


def checkpoint_steps(workdir: str) -> list[int]:
  """The finished checkpoint steps, ascending (unfinished saves are temporary folders)."""
  d = checkpoint_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.exists(os.path.join(d, n, "_CHECKPOINT_METADATA")))


def load_checkpoint(workdir: str, step: int | None = None) -> dict:
  """The raw state of a checkpoint (latest by default) as host arrays.

  Returns:
    `{"step", "params", "opt_state"}`; every leaf but `step` has a leading
    seed axis (see `stnjax.train.TrainState`).
  """
  # pylint: disable=g-import-not-at-top  (heavy; readers of metrics and figures need neither)
  import jax
  import orbax.checkpoint as ocp
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}.")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise ValueError(f"`step` {step} has no checkpoint in {checkpoint_dir(workdir)}; "
                     f"available: {steps}.")
  # Restored onto this process's first device, whatever devices saved it.
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # The manager's one item; Orbax reads a relative path's metadata as missing.
  path = os.path.abspath(os.path.join(checkpoint_dir(workdir), str(step), "default"))
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                            metadata)
    raw = checkpointer.restore(path, abstract)
  return jax.device_get(dict(raw))


def restore(workdir: str, *, seed_index: int = 0, step: int | None = None):
  """`(model, params, config)` of a workdir's checkpoint (the latest by default).

  `model.apply({"params": params}, images)` classifies float32 images in
  [0, 1] of the run's input shape `(B, S, S, C)`. `seed_index` picks one of
  the `config.num_seeds` vmapped models (0: seed `config.seed`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from stnjax import train  # pylint: disable=g-import-not-at-top  (train imports this module)
  config = load_config(workdir)
  if not 0 <= seed_index < int(config.num_seeds):
    raise ValueError(f"`seed_index` must be in [0, {config.num_seeds}) for {workdir}, "
                     f"got {seed_index}.")
  model = train.create_model_from_config(config)
  params = jax.tree.map(lambda x: x[seed_index], load_checkpoint(workdir, step)["params"])
  return model, params, config


def save_npy(path: str, array) -> None:
  """`np.save` through a temporary file and an atomic rename (no torn snapshot)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def remove_snapshots_after(workdir: str, step: int) -> None:
  """Deletes the `st_outputs/step_XXXXXXXX.npy` of steps after `step` (to be rerun)."""
  d = st_outputs_dir(workdir)
  if os.path.isdir(d):
    for name in os.listdir(d):
      if name.startswith("step_") and name.endswith(".npy") and name[5:13].isdigit() and int(
          name[5:13]) > step:
        os.remove(os.path.join(d, name))


def snapshot_steps(workdir: str) -> list[tuple[int, str]]:
  """`[(step, path), ...]` of the transformer snapshots in `st_outputs/`, by step."""
  d = st_outputs_dir(workdir)
  if not os.path.isdir(d):
    return []
  return sorted((int(n[5:13]), os.path.join(d, n)) for n in os.listdir(d)
                if n.startswith("step_") and n.endswith(".npy") and n[5:13].isdigit()
                and len(n) == len("step_00000000.npy"))
