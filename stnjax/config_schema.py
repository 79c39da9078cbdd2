"""The config fields `stnjax.train` reads, and checks of a config against them.

`validate(config)` raises a `ValueError` (or `TypeError`) naming the field
and the value received: an unknown or misplaced field (with the nearest valid
one, e.g. `config.lr` -> `config.train.lr`), a missing field, a value of the
wrong type or out of range. `check_override_flags(argv)` does the same for
`--config.<field>=...` command-line overrides before absl parses them (absl
reports only `AttributeError: 'lr'`). The configs of
`experiments/configs/distorted_mnist.py` hold exactly these fields (tested).
"""

import difflib
import numbers
from collections.abc import Iterable

_INT, _NUM, _STR, _BOOL = "an integer", "a number", "a string", "a bool"

# Dotted field -> (kind, may be None).
FIELDS = {
    "seed": (_INT, False), "num_seeds": (_INT, False), "distributed": (_BOOL, False),
    "data.variant": (_STR, False), "data.source": (_STR, False),
    "data.mnist_dir": (_STR, True), "data.tfds_dir": (_STR, True),
    "data.synthetic_train_size": (_INT, False), "data.synthetic_eval_size": (_INT, False),
    "model.name": (_STR, False), "model.param_budget": (_INT, True),
    "model.width": (_INT, True), "model.st_pool": (_INT, False),
    "model.padding": (_STR, False),
    "paper_error": (_NUM, True),
    "train.optimizer": (_STR, False), "train.momentum": (_NUM, False),
    "train.lr": (_NUM, False), "train.lr_schedule": (_STR, False),
    "train.decay_every": (_INT, False), "train.decay_factor": (_NUM, False),
    "train.warmup_steps": (_INT, False), "train.batch_size": (_INT, False),
    "train.num_steps": (_INT, False),
    "eval_batch_size": (_INT, False), "keep_checkpoints": (_INT, False),
    "figure_examples": (_INT, False), "progress": (_BOOL, False),
    "log_every": (_INT, False), "eval_every": (_INT, False), "checkpoint_every": (_INT, False),
}
_SECTIONS = frozenset(name.split(".")[0] for name in FIELDS if "." in name)

CHOICES = {"data.source": ("mnist", "synthetic"), "train.optimizer": ("sgd", "adam"),
           "model.padding": ("VALID", "SAME", "VALID_MIN2"),
           "train.lr_schedule": ("constant", "step", "cosine")}
AT_LEAST_ONE = ("num_seeds", "train.batch_size", "eval_batch_size", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints", "train.decay_every",
                "data.synthetic_train_size", "data.synthetic_eval_size", "model.st_pool")
AT_LEAST_ZERO = ("train.num_steps", "train.warmup_steps", "figure_examples", "seed")


def nearest_field(name: str) -> str | None:
  """The valid field a misspelt or misplaced `name` most likely meant, or None."""
  leaf = name.split(".")[-1]
  same_leaf = [f for f in FIELDS if f.split(".")[-1] == leaf]
  if same_leaf:
    return same_leaf[0]
  close = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.6)
  if close:
    return close[0]
  leaves = {f.split(".")[-1]: f for f in FIELDS}
  close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
  return leaves[close[0]] if close else None


def _unknown(name: str, prefix: str = "config.") -> str:
  guess = nearest_field(name)
  hint = f"; did you mean `{prefix}{guess}`?" if guess else f" (valid fields: {sorted(FIELDS)})"
  return f"Unknown config field `{prefix}{name}`{hint}"


def _sentence(text: str) -> str:
  return text if text.endswith("?") else text + "."


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items") and not isinstance(v, str):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _is_kind(value, kind: str) -> bool:
  if kind == _BOOL:
    return isinstance(value, bool)
  if isinstance(value, bool):
    return False
  if kind == _INT:
    return isinstance(value, numbers.Integral)
  if kind == _NUM:
    return isinstance(value, numbers.Real)
  return isinstance(value, str)


def validate(config) -> None:
  """Raises if `config` (a `ConfigDict` or nested dict) is not a valid training config."""
  flat = _flatten(config.to_dict() if hasattr(config, "to_dict") else config)
  unknown = sorted(set(flat) - set(FIELDS))
  if unknown:
    raise ValueError(_sentence("; ".join(_unknown(n) for n in unknown)))
  missing = sorted(set(FIELDS) - set(flat))
  if missing:
    raise ValueError(f"The config lacks the field(s) {', '.join('config.' + m for m in missing)} "
                     f"(see experiments/configs/distorted_mnist.py).")
  for name, (kind, optional) in FIELDS.items():
    value = flat[name]
    if value is None and optional:
      continue
    if not _is_kind(value, kind):
      raise TypeError(f"`config.{name}` must be {kind}, got {value!r} ({type(value).__name__}).")
  for name, choices in CHOICES.items():
    if flat[name] not in choices:
      raise ValueError(f"`config.{name}` must be one of {choices}, got {flat[name]!r}.")
  for names, low in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
    for name in names:
      if flat[name] < low:
        raise ValueError(f"`config.{name}` must be >= {low}, got {flat[name]}.")
  from stnjax import input_pipeline  # pylint: disable=g-import-not-at-top
  from stnjax import models  # pylint: disable=g-import-not-at-top
  if flat["data.variant"] not in input_pipeline.SYNTHETIC_SHAPES:
    raise ValueError(f"`config.data.variant` must be one of "
                     f"{sorted(input_pipeline.SYNTHETIC_SHAPES)}, got {flat['data.variant']!r}.")
  try:
    models.parse_model_name(flat["model.name"])
  except ValueError as e:
    raise ValueError(f"`config.model.name`: {e}") from None
  if (flat["model.width"] is None) == (flat["model.param_budget"] is None):
    raise ValueError(f"Exactly one of `config.model.width` and `config.model.param_budget` must "
                     f"be set, got {flat['model.width']!r} and {flat['model.param_budget']!r}.")
  for name in ("model.width", "model.param_budget"):
    if flat[name] is not None and flat[name] < 1:
      raise ValueError(f"`config.{name}` must be >= 1, got {flat[name]}.")


def check_override_flags(argv: Iterable[str], flag: str = "config") -> None:
  """Raises `ValueError` for a `--config.<field>` override that names no valid field."""
  for arg in argv:
    for prefix in (f"--{flag}.", f"--no{flag}."):
      if arg.startswith(prefix):
        name = arg[len(prefix):].split("=", 1)[0]
        if name not in FIELDS and name not in _SECTIONS:
          raise ValueError(_sentence(_unknown(name, prefix=f"--{flag}.")))
