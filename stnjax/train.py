"""Training and evaluation: `train_and_evaluate(config, workdir)`.

* The training pool (uint8) is uploaded to the devices once; every batch is
  drawn and distorted on the device by a jitted function of `(pool, keys,
  step)`, with per-step keys `fold_in(data_key, step)`, so the host does no
  per-step work beyond passing the step index.
* The step is one pure jitted function `(state, batch) -> (state, metrics)`
  with `donate_argnums=0`.
* `config.num_seeds` independent models (seeds `config.seed + i`, each with
  its own initialisation and data stream) are trained in one program with
  `jax.vmap` over the parameter sets: one compile for a table row. Every
  state leaf except `step` has a leading seed axis.
* Data parallel over all devices with `jax.sharding`: a 1-D `Mesh` named
  "data"; batches are sharded along the example axis, parameters and
  optimizer state replicated. The step is a `jax.shard_map`: each device
  takes the gradient of its part of the batch, and one all-reduce (the
  large leaves and one flat vector of the rest) averages them
  (`all_reduce_mean`). The same code runs on 1 CPU, 1 GPU or N devices.
  With several CPU devices (`JAX_NUM_CPU_DEVICES=N`, or
  `XLA_FLAGS=--xla_force_host_platform_device_count=N`) the loop keeps one
  step, and one evaluation batch, in flight: with dozens queued, XLA:CPU's
  gradient all-reduce waited forever for a device that never ran (jax
  0.10.2, 2 and 4 CPU devices on 2 cores; tested), and an evaluation's sum
  over its batch did so once in the reproduction's CPU runs.
* Multi-host: `config.distributed = True`; every process runs the same
  program over the global mesh of all processes' devices (CPU processes
  all-reduce over gloo). `initialize_distributed` joins the cluster (from the
  environment on SLURM / TPU, or an explicit coordinator address, process
  count and index; see docs/training.md). Only process 0 writes
  `config.json`, metrics and figure data; Orbax coordinates checkpoints. Two
  processes on one machine train to the same numbers as one process with the
  same global batch, and resume after a kill (tests/test_multihost.py).
* Evaluation covers the whole validation and test sets: they are padded to a
  multiple of `config.eval_batch_size` with a mask, and exact counts
  (`ncorrect`, `loss_sum`, `nseen`) are summed; the error is
  `100 * (1 - ncorrect / nseen)`. For ST models it also reports the mean and
  std over the set of every regressed transform parameter.

`workdir` is the single source of truth (format: `stnjax.workdir`): the
config is validated (`stnjax.config_schema`) and checked against the
workdir's `config.json` before anything is written; a run restarted with the
same workdir resumes from the latest checkpoint (or starts afresh if there is
none), dropping the metrics and figure snapshots logged after it, and ends
with exactly the same parameters, optimizer state and metrics (timings
aside) as an uninterrupted run, whenever the first run was killed.
`num_steps = 0` evaluates the initial model.

A non-finite training loss raises `FloatingPointError` naming the first bad
step (checked at every log, eval and checkpoint step), and so do non-finite
parameters at a checkpoint step, before they are saved: no checkpoint holds
a NaN.
"""

import math
import os
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stnjax import config_schema
from stnjax import input_pipeline
from stnjax import models
from stnjax import workdir as workdir_lib


class TrainState(NamedTuple):
  """Training state; every leaf but `step` has a leading seed axis `(num_seeds, ...)`."""
  step: jax.Array  # int32 scalar: number of steps taken.
  params: Any
  opt_state: Any


def create_learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """`config.train` -> schedule. "step": lr * decay_factor ** (step // decay_every)."""
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.lr)
  if config.lr_schedule == "step":
    every = int(config.decay_every)
    if every < 1:
      raise ValueError(f"`config.train.decay_every` must be >= 1, got {every}.")
    return lambda count: config.lr * config.decay_factor ** (count // every)
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps,
                                              max(config.num_steps, config.warmup_steps + 1))
  raise ValueError(f"`config.train.lr_schedule` must be 'constant', 'step' or 'cosine', "
                   f"got {config.lr_schedule!r}.")


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`config.train` -> optax optimizer ("sgd" with optional momentum, or "adam")."""
  lr = create_learning_rate(config)
  if config.optimizer == "sgd":
    return optax.sgd(lr, momentum=config.get("momentum") or None)
  if config.optimizer == "adam":
    return optax.adam(lr)
  raise ValueError(f"`config.train.optimizer` must be 'sgd' or 'adam', got {config.optimizer!r}.")


def create_model_from_config(config, dataset=None):
  """The model of `config.model` for `dataset`'s shapes (default: the variant's shapes)."""
  m = config.model
  if dataset is None:
    size, channels, num_classes = input_pipeline.SYNTHETIC_SHAPES[config.data.variant]
    input_shape = (size, size, channels)
  else:
    input_shape, num_classes = dataset.input_shape, dataset.num_classes
  return models.create_model(m.name, input_shape, num_classes,
                             width=m.get("width"), param_budget=m.get("param_budget"),
                             st_pool=m.get("st_pool", 1), padding=m.padding)


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def all_reduce_mean(tree, axis_name, own_operand_size: int = 2**16):
  """The mean of every leaf of `tree` over `axis_name`, in one all-reduce.

  Use inside `jax.shard_map`. Leaves of at least `own_operand_size`
  elements are operands of their own; the rest are concatenated into one
  flat vector (promoted to a common dtype, cast back after). XLA:CPU
  reduces a many-operand all-reduce operand by operand, so many small
  leaves are faster as one vector (see `make_functions`); a large leaf is
  faster alone, as copying it into the vector can stall the device threads
  (docs/performance.md, the data-parallel profile). The default, 2**16,
  lies between the paper CNNs' 7x7 kernels (over 360k elements) and the
  STN tutorial's largest leaf (16k).
  """
  leaves, treedef = jax.tree.flatten(tree)
  own = [leaf.size >= own_operand_size for leaf in leaves]
  flat, unflatten = jax.flatten_util.ravel_pytree([x for x, o in zip(leaves, own) if not o])
  flat, large = jax.lax.pmean((flat, [x for x, o in zip(leaves, own) if o]), axis_name)
  small, large = iter(unflatten(flat)), iter(large)
  return jax.tree.unflatten(treedef, [next(large) if o else next(small) for o in own])


def make_functions(model, optimizer, dataset, mesh, batch_size: int):
  """The jitted functions of a run (pure; shardings from `mesh`).

  Returns:
    init(seed_keys (S, 2)) -> TrainState
    sample_batch(pool_images, pool_labels, data_keys (S, 2), step) -> batch
      {"image": (S, B, H, W, C), "label": (S, B)}, sharded along B.
    train_step(state, batch) -> (state, metrics per seed)
    eval_batch(params, images, labels, mask) -> exact sums per seed
    st_outputs(params, images) -> the first seed's transformer outputs
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(None, "data"))
  input_shape = dataset.input_shape

  def init_one(key):
    init_key, _ = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1,) + input_shape, jnp.float32))["params"]
    return params, optimizer.init(params)

  @jax.jit
  def init(seed_keys):
    params, opt_state = jax.vmap(init_one)(seed_keys)
    state = TrainState(jnp.zeros((), jnp.int32), params, opt_state)
    return jax.lax.with_sharding_constraint(state, replicated)

  @jax.jit
  def sample_batch(pool_images, pool_labels, data_keys, step):
    def one(key):
      return dataset.sample(jax.random.fold_in(key, step), pool_images, pool_labels, batch_size)
    images, labels = jax.vmap(one)(data_keys)
    batch = {"image": images, "label": labels}
    return jax.lax.with_sharding_constraint(batch, batch_sharding)

  def local_grads(params, images, labels):
    """One seed's loss, accuracy and gradients on this device's part of the batch."""
    def loss_fn(p):
      logits = model.apply({"params": p}, images)
      return _cross_entropy(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

  def apply_update(params, opt_state, grads):
    """One seed's optimizer step (replicated: every device computes the same)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    norms = {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
    return params, opt_state, norms

  def device_step(state, batch):
    """The step on one device's shard of the batch (inside `shard_map`).

    Every device holds the same state and an equal part of the batch; the
    per-device mean gradients and metrics are averaged over "data" in one
    all-reduce, which equals the gradient of the mean over the whole batch.
    Its operands are the large leaves and one flat vector of the rest, not
    one per parameter: XLA:CPU's all-reduce runs one rendezvous of the
    device threads per operand (the STN tutorial's step on 2 CPU devices: 1.19x-1.27x torch's
    speed vs 0.94x-1.04x, see docs/performance.md, the training benchmark).
    """
    # Per-device gradients: differentiating the replicated parameters
    # themselves would make JAX all-reduce each gradient separately.
    local_params = jax.lax.pcast(state.params, "data", to="varying")
    grads, metrics = jax.vmap(local_grads)(local_params, batch["image"], batch["label"])
    grads, metrics = all_reduce_mean((grads, metrics), "data")
    params, opt_state, norms = jax.vmap(apply_update)(state.params, state.opt_state, grads)
    return TrainState(state.step + 1, params, opt_state), {**metrics, **norms}

  _train_step = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(None, "data")),
                              out_specs=(P(), P()))
  train_step = jax.jit(_train_step, donate_argnums=0)

  def eval_one(params, images, labels, mask):
    logits, inter = model.apply({"params": params}, images, mutable=["intermediates"])
    loss = _cross_entropy(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    sums = {"ncorrect": jnp.sum(jnp.where(mask, correct, False).astype(jnp.int32)),
            "loss_sum": jnp.sum(jnp.where(mask, loss, 0.0)),
            "nseen": jnp.sum(mask.astype(jnp.int32))}
    thetas = inter.get("intermediates", {}).get("theta")
    if thetas is not None:
      theta = jnp.concatenate([t for t in jax.tree.leaves(thetas)], axis=-1)  # (B, P_total)
      w = mask[:, None].astype(theta.dtype)
      sums["theta_sum"] = jnp.sum(theta * w, 0)
      sums["theta_sq_sum"] = jnp.sum(theta * theta * w, 0)
    return sums

  @jax.jit
  def eval_batch(params, images, labels, mask):
    images = input_pipeline.to_float(images)
    images, labels, mask = jax.lax.with_sharding_constraint(
        (images, labels, mask), NamedSharding(mesh, P("data")))
    return jax.vmap(eval_one, in_axes=(0, None, None, None))(params, images, labels, mask)

  @jax.jit
  def st_outputs(params, images):
    first = jax.tree.map(lambda p: p[0], params)
    _, inter = model.apply({"params": first}, input_pipeline.to_float(images),
                           mutable=["intermediates"])
    outs = inter.get("intermediates", {}).get("st_output")
    if outs is None:
      return jnp.zeros((0,), jnp.float32)
    return jnp.stack(list(outs), axis=1)  # (B, num_transformers, H, W, C)

  return init, sample_batch, train_step, eval_batch, st_outputs


def _pad_eval_set(images, labels, batch_size):
  n = len(labels)
  total = max(batch_size, math.ceil(n / batch_size) * batch_size)
  pad = total - n
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([np.asarray(labels, np.int32), np.zeros((pad,), np.int32)])
  mask = np.arange(total) < n
  return images, labels, mask


def evaluate(eval_batch, params, padded, batch_size: int,
             one_in_flight: bool = False) -> dict[str, np.ndarray]:
  """Exact sums over a padded eval set (host loop over batches, one transfer at the end).

  `one_in_flight` waits for each batch before dispatching the next: on
  several CPU devices, XLA:CPU can deadlock with many all-reducing programs
  queued (module docstring).
  """
  images, labels, mask = padded
  totals = None
  for i in range(0, len(labels), batch_size):
    sums = eval_batch(params, images[i:i + batch_size], labels[i:i + batch_size],
                      mask[i:i + batch_size])
    if one_in_flight:
      jax.block_until_ready(sums)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return jax.device_get(totals)


def summarize_eval(split: str, sums: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Exact eval sums (per seed) -> JSON-ready metrics (error in %)."""
  nseen = sums["nseen"].astype(np.float64)
  error = 100.0 * (1.0 - sums["ncorrect"] / nseen)
  loss = sums["loss_sum"] / nseen
  out = {f"{split}/error": float(error.mean()), f"{split}/loss": float(loss.mean()),
         f"{split}/error_per_seed": error.tolist(), f"{split}/loss_per_seed": loss.tolist(),
         f"{split}/ncorrect": sums["ncorrect"].tolist(), f"{split}/nseen": int(sums["nseen"][0])}
  if "theta_sum" in sums:
    mean = sums["theta_sum"] / nseen[:, None]
    var = np.maximum(sums["theta_sq_sum"] / nseen[:, None] - mean ** 2, 0.0)
    out[f"{split}/theta_mean"] = mean.mean(0).tolist()  # Averaged over seeds.
    out[f"{split}/theta_std"] = np.sqrt(var).mean(0).tolist()
  return out


def _check_finite_params(params, step: int, first_seed: int, workdir: str):
  """Raises `FloatingPointError` naming the step and seed if any parameter is not finite."""
  finite = jax.device_get(jax.tree.reduce(
      jnp.logical_and,
      jax.tree.map(lambda x: jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1), params)))
  if not finite.all():
    seed = int(np.argmin(finite))
    raise FloatingPointError(f"Non-finite parameters after step {step} (seed index {seed}, "
                             f"seed {first_seed + seed}); not checkpointed; workdir {workdir}.")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None):
  """Joins a multi-process run (`jax.distributed.initialize`), once per process.

  With no arguments the cluster is read from the environment (SLURM, TPU,
  ...). CPU processes all-reduce over gloo. Call before anything touches a
  JAX device.
  """
  if jax.distributed.is_initialized():
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> TrainState:
  """Trains `config.num_seeds` models, evaluates them and writes everything to `workdir`.

  Args:
    config: see `experiments/configs/distorted_mnist.py`; the fields are
      those of `stnjax.config_schema.FIELDS`, checked before anything runs.
    workdir: output directory; an existing one is resumed if its
      `config.json` agrees with `config` in every field that changes the run
      (`stnjax.workdir.check_resumable`), else this raises.
    allow_config_change: resume even so, continuing the last checkpoint under
      `config` (the previous `config.json` is kept beside the new one).

  Returns:
    The final `TrainState` (leaves with a leading seed axis, on the devices).
  """
  config_schema.validate(config)
  if config.distributed:
    initialize_distributed()
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  workdir_lib.check_resumable(config, workdir, allow_config_change=allow_config_change)
  num_seeds, batch_size, num_steps = int(config.num_seeds), int(config.train.batch_size), int(
      config.train.num_steps)
  devices = jax.devices()
  for name, value in (("config.train.batch_size", batch_size),
                      ("config.eval_batch_size", config.eval_batch_size)):
    if value % len(devices):
      raise ValueError(f"`{name}`={value} must be divisible by the number of devices "
                       f"({len(devices)}; on a CPU, JAX_NUM_CPU_DEVICES sets it).")
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    steps = workdir_lib.checkpoint_steps(workdir)
    workdir_lib.write_config(config, workdir, resumed_at=steps[-1] if steps else 0)
  # See the module docstring: XLA:CPU can deadlock with many multi-device
  # programs queued, so on CPU each step and evaluation batch is waited for
  # before the next.
  one_step_in_flight = len(devices) > 1 and devices[0].platform == "cpu"
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))

  dataset = input_pipeline.load(config.data)
  model = create_model_from_config(config, dataset)
  optimizer = create_optimizer(config.train)
  init, sample_batch, train_step, eval_batch, st_outputs = make_functions(
      model, optimizer, dataset, mesh, batch_size)

  replicated = NamedSharding(mesh, P())
  put = lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda idx: x[idx])
  pool_images, pool_labels = put(dataset.train_images), put(dataset.train_labels)
  seed_keys = np.stack([np.asarray(jax.random.PRNGKey(config.seed + i)) for i in range(num_seeds)])
  data_keys = put(np.stack([np.asarray(jax.random.split(k)[1]) for k in seed_keys]))
  eval_bs = int(config.eval_batch_size)
  eval_sets = {split: tuple(put(a) for a in _pad_eval_set(*dataset.eval_sets[split], eval_bs))
               for split in ("validation", "test")}
  fig_n = min(int(config.figure_examples), len(dataset.eval_sets["test"][1]))
  fig_inputs = put(np.asarray(dataset.eval_sets["test"][0][:fig_n]))

  state = init(put(seed_keys))
  ckpt_dir = workdir_lib.checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=int(config.keep_checkpoints), create=True, enable_async_checkpointing=False))
  writer = workdir_lib.MetricsWriter(workdir, is_main)
  fig_dir = workdir_lib.st_outputs_dir(workdir)
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    state = TrainState(*state) if not isinstance(state, TrainState) else state
    logging.info("Resumed from %s at step %d.", ckpt_dir, latest)
  # Drop what a killed run logged after its last checkpoint (everything, if
  # it was killed before its first one): the steps after it are rerun.
  resumed_at = -1 if latest is None else latest
  if is_main:
    workdir_lib.truncate_metrics(workdir, resumed_at)
    workdir_lib.remove_snapshots_after(workdir, resumed_at)
  start = int(jax.device_get(state.step))

  def save_st_outputs(step):
    outs = np.asarray(jax.device_get(st_outputs(state.params, fig_inputs)))
    if is_main and outs.size:
      os.makedirs(fig_dir, exist_ok=True)
      if not os.path.exists(os.path.join(fig_dir, "inputs.npy")):  # Written once.
        workdir_lib.save_npy(os.path.join(fig_dir, "inputs.npy"), np.asarray(
            input_pipeline.to_float(np.asarray(dataset.eval_sets["test"][0][:fig_n]))))
      workdir_lib.save_npy(os.path.join(fig_dir, f"step_{step:08d}.npy"), outs)

  def run_eval(step):
    metrics = {}
    for split, padded in eval_sets.items():
      sums = evaluate(eval_batch, state.params, padded, eval_bs, one_in_flight=one_step_in_flight)
      metrics.update(summarize_eval(split, sums))
    writer.write(step, metrics)
    save_st_outputs(step)
    return metrics

  pending = []  # (step, device metrics) since the last flush.
  last_flush = [time.perf_counter(), start]

  def flush(step):
    """Fetches pending train metrics, checks them, logs their means."""
    if not pending:
      return {}
    steps = [s for s, _ in pending]
    fetched = jax.device_get([m for _, m in pending])
    pending.clear()
    losses = np.stack([m["loss"] for m in fetched])  # (n, num_seeds)
    bad = ~np.isfinite(losses)
    if bad.any():
      i, seed = np.argwhere(bad)[0]
      raise FloatingPointError(f"Non-finite training loss {losses[i, seed]} at step {steps[i]} "
                               f"(seed index {seed}, seed {config.seed + seed}); "
                               f"workdir {workdir}.")
    now = time.perf_counter()
    metrics = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    metrics["train/loss_per_seed"] = losses.mean(0).tolist()
    metrics["train/steps_per_sec"] = (step - last_flush[1]) / max(now - last_flush[0], 1e-9)
    metrics["train/lr"] = float(create_learning_rate(config.train)(step - 1))
    last_flush[:] = [now, step]
    writer.write(step, metrics)
    return metrics

  if start == 0:
    if num_steps == 0:
      logging.info("config.train.num_steps = 0: evaluating the initial model only.")
    run_eval(0)
  progress = None
  if config.get("progress") and is_main and start < num_steps:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True)
  for step in range(start + 1, num_steps + 1):
    batch = sample_batch(pool_images, pool_labels, data_keys, step - 1)
    state, metrics = train_step(state, batch)
    pending.append((step, metrics))
    if one_step_in_flight:
      jax.block_until_ready(metrics)
    is_last = step == num_steps
    is_eval = step % config.eval_every == 0 or is_last
    is_ckpt = step % config.checkpoint_every == 0 or is_last
    if step % config.log_every == 0 or is_eval or is_ckpt:
      logged = flush(step)
      if progress is not None and logged:
        progress.set_postfix(loss=f"{logged['train/loss']:.4f}",
                             steps_per_s=f"{logged['train/steps_per_sec']:.1f}")
    if is_eval:
      metrics = run_eval(step)
      logging.info("step %d: test error %.2f%%, validation error %.2f%%", step,
                   metrics["test/error"], metrics["validation/error"])
    if is_ckpt:
      _check_finite_params(state.params, step, config.seed, workdir)
      manager.save(step, args=ocp.args.StandardSave(state))
    if is_eval or is_ckpt:
      last_flush[:] = [time.perf_counter(), step]  # Keep eval/checkpoint time out of steps/s.
    if progress is not None:
      progress.update(1)
  if progress is not None:
    progress.close()
  if start >= num_steps > 0:
    logging.info("Checkpoint at step %d >= num_steps %d: nothing to train.", start, num_steps)
  manager.wait_until_finished()
  manager.close()
  return state
