"""Training steps/s: the PyTorch STN tutorial network vs stnjax, on this machine.

  python -m scripts.bench.bench_train [--steps 50] [--warmup 5] [--rounds 3] [--cpu-devices N]
      [--out results/bench/train.json]

Rows 1-4 are timed in `--rounds` interleaved rounds (the networks take
turns, so machine noise hits them alike), each round the median over
`--steps` timed steps after `--warmup`; the table gives the median over
rounds. Each step is synchronised (`block_until_ready` / torch's eager CPU
execution, or `torch.cuda.synchronize` when torch runs on a GPU: torch takes
CUDA when it has it, as JAX takes its default backend). Row 5 is timed once,
after the others.

1. torch: the PyTorch "Spatial Transformer Networks" tutorial network,
   written here from its description (classifier conv(1,10,5)-maxpool-relu-
   conv(10,20,5)-dropout2d-maxpool-relu-fc(320,50)-relu-dropout-fc(50,10);
   localisation conv(1,8,7)-maxpool-relu-conv(8,10,5)-maxpool-relu; fc_loc
   Linear(90,32)-ReLU-Linear(32,6), identity init), SGD lr 0.01, batch 64,
   28x28, NLL loss on log-softmax.
2. stnjax: the same network in flax + stnjax (same layers, dropout, SGD lr
   0.01, batch 64), one jitted step; convolutions and max pools are stnjax's
   (`models.Conv`, `layers.max_pool`: same values as flax's, faster
   gradients on CPU), as in stnjax's own models.
3. stnjax, data parallel: row 2's step with the batch sharded over
   `--cpu-devices` CPU devices (default: one per core; JAX's way to use
   several cores for data parallelism, `JAX_NUM_CPU_DEVICES`), parameters
   replicated, each device's gradients averaged in one all-reduce of one
   flat vector (`jax.shard_map` and `train.all_reduce_mean`, as in
   `stnjax.train`). Only on CPU, with more than one device.
4. torch and flax: the tutorial's classifier alone (no transformer), to
   attribute the difference between rows 1 and 2 to the transformer or to
   the framework's convolutions.
5. stnjax: the paper-size ST-CNN (`st_cnn_aff`, ~400k parameters) on 42x42 RTS
   inputs at batch 256, with the training loop's own jitted step
   (`stnjax.train.make_functions`, on-device batch sampling included),
   data parallel over all devices as in `stnjax.train`.

Prints a Markdown table with the ratio stnjax / torch and the device and,
with --out, writes the steps/s and the provenance as JSON.

Row 5 also reports its minor page faults per step: XLA:CPU allocates each
call's temporaries afresh. The script restarts itself, as the training
scripts do, with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which on Linux with
glibc >= 2.35 backs them with transparent huge pages (docs/performance.md,
"Memory"; `GLIBC_TUNABLES= python -m ...` keeps glibc's defaults).
"""

import argparse
import os
import platform
import resource
import statistics
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import stnjax
from scripts.bench import timing
from stnjax import input_pipeline
from stnjax import layers
from stnjax import models
from stnjax import train
from stnjax import xla_cpu

BATCH = 64
TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def median_steps_per_sec(step, warmup, steps):
  return 1.0 / timing.median_seconds(lambda _: step(), warmup=warmup, repeats=steps)


def interleaved_steps_per_sec(steps_by_row, warmup, steps, rounds):
  """Median steps/s per row over `rounds` rounds in which the rows take turns.

  Interleaving makes a noisy machine slow every row alike instead of
  whichever row happened to run at the wrong moment.
  """
  per_round = {name: [] for name in steps_by_row}
  for _ in range(rounds):
    for name, step in steps_by_row.items():
      per_round[name].append(median_steps_per_sec(step, warmup, steps))
  return {name: statistics.median(v) for name, v in per_round.items()}, per_round


class TorchNet(torch.nn.Module):
  """The PyTorch STN tutorial network."""

  def __init__(self, use_st=True):
    super().__init__()
    self.use_st = use_st
    self.conv1 = torch.nn.Conv2d(1, 10, kernel_size=5)
    self.conv2 = torch.nn.Conv2d(10, 20, kernel_size=5)
    self.conv2_drop = torch.nn.Dropout2d()
    self.fc1 = torch.nn.Linear(320, 50)
    self.fc2 = torch.nn.Linear(50, 10)
    self.localization = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, kernel_size=7), torch.nn.MaxPool2d(2, stride=2), torch.nn.ReLU(True),
        torch.nn.Conv2d(8, 10, kernel_size=5), torch.nn.MaxPool2d(2, stride=2), torch.nn.ReLU(True))
    self.fc_loc = torch.nn.Sequential(torch.nn.Linear(10 * 3 * 3, 32), torch.nn.ReLU(True),
                                      torch.nn.Linear(32, 3 * 2))
    self.fc_loc[2].weight.data.zero_()
    self.fc_loc[2].bias.data.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float))

  def stn(self, x):
    xs = self.localization(x).view(-1, 10 * 3 * 3)
    theta = self.fc_loc(xs).view(-1, 2, 3)
    grid = F.affine_grid(theta, x.size(), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)

  def forward(self, x):
    if self.use_st:
      x = self.stn(x)
    x = F.relu(F.max_pool2d(self.conv1(x), 2))
    x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
    x = x.view(-1, 320)
    x = F.relu(self.fc1(x))
    x = F.dropout(x, training=self.training)
    return F.log_softmax(self.fc2(x), dim=1)


def torch_step(use_st=True):
  """One synchronous training step of the torch tutorial network (a callable)."""
  torch.manual_seed(0)
  model = TorchNet(use_st).train().to(TORCH_DEVICE)
  opt = torch.optim.SGD(model.parameters(), lr=0.01)
  x = torch.rand(BATCH, 1, 28, 28).to(TORCH_DEVICE)
  y = torch.randint(0, 10, (BATCH,)).to(TORCH_DEVICE)
  sync = torch.cuda.synchronize if TORCH_DEVICE == "cuda" else (lambda: None)

  def step():
    opt.zero_grad()
    loss = F.nll_loss(model(x), y)
    loss.backward()
    opt.step()
    sync()

  return step


class TutorialLocalisation(nn.Module):
  max_pool: Callable = layers.max_pool

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.max_pool(models.Conv(8, (7, 7), padding="VALID")(x), (2, 2), (2, 2)))
    x = nn.relu(self.max_pool(models.Conv(10, (5, 5), padding="VALID")(x), (2, 2), (2, 2)))
    return nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))


class TutorialNet(nn.Module):
  """The tutorial network in flax (channels-last), with stnjax's SpatialTransformer."""
  use_st: bool = True
  max_pool: Callable = layers.max_pool  # The ablation passes `flax.linen.max_pool`.

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.use_st:
      x, _ = models.SpatialTransformer(TutorialLocalisation(self.max_pool), "affine")(x)
    x = nn.relu(self.max_pool(models.Conv(10, (5, 5), padding="VALID")(x), (2, 2), (2, 2)))
    x = models.Conv(20, (5, 5), padding="VALID")(x)
    x = nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=not train)(x)  # Dropout2d.
    x = nn.relu(self.max_pool(x, (2, 2), (2, 2)))
    x = nn.relu(nn.Dense(50)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.log_softmax(nn.Dense(10)(x))


def flax_tutorial_step(use_st=True, data_parallel=False, max_pool=layers.max_pool):
  """One synchronous training step of the flax + stnjax tutorial network (a callable).

  With `data_parallel`, the batch is sharded over all devices and the state
  replicated; as in `stnjax.train`, each device computes the gradient of its
  part of the batch inside `jax.shard_map` and one all-reduce of one flat
  vector averages them (`train.all_reduce_mean`).
  """
  model = TutorialNet(use_st, max_pool)
  x = jax.random.uniform(jax.random.key(0), (BATCH, 28, 28, 1))
  y = jax.random.randint(jax.random.key(1), (BATCH,), 0, 10)
  params = model.init(jax.random.key(2), x, train=False)["params"]
  tx = optax.sgd(0.01)
  state = (params, tx.init(params), jnp.zeros((), jnp.int32))

  def loss_grads(params, x, y, key):
    def loss_fn(p):
      logp = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
      return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))
    return jax.grad(loss_fn)(params)

  def apply_update(state, grads):
    params, opt_state, step = state
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, step + 1

  dropout_key = lambda step: jax.random.fold_in(jax.random.key(3), step)
  if data_parallel:
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))

    def device_step(state, x, y):  # On one device's part of the batch.
      key = jax.random.fold_in(dropout_key(state[2]), jax.lax.axis_index("data"))
      grads = loss_grads(jax.lax.pcast(state[0], "data", to="varying"), x, y, key)
      return apply_update(state, train.all_reduce_mean(grads, "data"))

    train_step = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                               out_specs=P())
  else:
    def train_step(state, x, y):
      return apply_update(state, loss_grads(state[0], x, y, dropout_key(state[2])))

  train_step = jax.jit(train_step, donate_argnums=0)
  holder = [state]

  def step():
    holder[0] = jax.block_until_ready(train_step(holder[0], x, y))

  return step


def paper_st_cnn_step(batch=256):
  """A training step of the paper-size ST-CNN Aff on RTS (a callable) and its parameter count."""
  config = ml_collections.ConfigDict({"variant": "RTS", "source": "synthetic",
                                      "synthetic_train_size": 512, "synthetic_eval_size": 8})
  dataset = input_pipeline.load(config)
  model = models.create_model("st_cnn_aff", dataset.input_shape, dataset.num_classes,
                              param_budget=400_000, st_pool=2)
  tx = optax.sgd(0.01)
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  init, sample_batch, train_step, _, _ = train.make_functions(model, tx, dataset, mesh, batch)
  state = init(jnp.asarray(jax.random.PRNGKey(0))[None])
  pool = (jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels))
  keys = jnp.asarray(jax.random.PRNGKey(1))[None]
  holder = [state, 0]

  def step():
    batch_ = sample_batch(*pool, keys, holder[1])
    holder[0], metrics = train_step(holder[0], batch_)
    jax.block_until_ready(metrics)
    holder[1] += 1

  return step, models.count_params(model, dataset.input_shape)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--cpu-devices", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU devices for the data-parallel row (default: one per core)")
  parser.add_argument("--out", default=None, help="JSON file for the results (optional)")
  args = parser.parse_args()
  xla_cpu.configure(args.cpu_devices)  # Before the backend starts, as experiments/train.py.
  jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  load_before = os.getloadavg()[0]
  rows = {"torch": torch_step(), "flax": flax_tutorial_step()}
  data_parallel = jax.default_backend() == "cpu" and jax.device_count() > 1
  if data_parallel:
    rows["flax_dp"] = flax_tutorial_step(data_parallel=True)
  # The same classifier without the transformer, to attribute the difference.
  rows.update(torch_plain=torch_step(use_st=False), flax_plain=flax_tutorial_step(use_st=False))
  sps, _ = interleaved_steps_per_sec(rows, args.warmup, args.steps, args.rounds)
  paper_step, paper_params = paper_st_cnn_step()
  paper_steps = max(10, args.steps // 5)
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  paper_sps = median_steps_per_sec(paper_step, 2, paper_steps)
  paper_faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / (
      paper_steps + 2)
  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}); "
        f"jax {jax.__version__}, "
        f"torch {torch.__version__} ({TORCH_DEVICE}, {torch.get_num_threads()} threads), stnjax "
        f"{stnjax.__version__}, python {sys.version.split()[0]}; load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds of "
        f"{args.steps} steps\n")
  print("| network | framework | batch | input | steps/s (median) | ratio vs torch |")
  print("|---|---|---|---|---|---|")
  print(f"| PyTorch STN tutorial | torch | {BATCH} | 28x28 | {sps['torch']:.1f} | 1.00 |")
  print(f"| PyTorch STN tutorial (same net) | stnjax/flax | {BATCH} | 28x28 | {sps['flax']:.1f} | "
        f"{sps['flax'] / sps['torch']:.2f} |")
  if data_parallel:
    print(f"| same, data parallel on {jax.device_count()} CPU devices | stnjax/flax | {BATCH} | "
          f"28x28 | {sps['flax_dp']:.1f} | {sps['flax_dp'] / sps['torch']:.2f} |")
  print(f"| tutorial classifier, no transformer | torch | {BATCH} | 28x28 | "
        f"{sps['torch_plain']:.1f} | 1.00 |")
  print(f"| tutorial classifier, no transformer | flax | {BATCH} | 28x28 | "
        f"{sps['flax_plain']:.1f} | {sps['flax_plain'] / sps['torch_plain']:.2f} |")
  print(f"| paper ST-CNN Aff ({paper_params:,} params), {jax.device_count()} device(s) | "
        f"stnjax/flax | 256 | 42x42 RTS | {paper_sps:.2f} | - |")
  print(f"\nRow 5: {paper_faults:,.0f} minor page faults per step "
        f"(GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}).")
  timing.write_results(args.out, {
      "batch": BATCH, "rounds": args.rounds, "steps": args.steps,
      "torch": f"{torch.__version__} ({TORCH_DEVICE}, {torch.get_num_threads()} threads)",
      "steps_per_sec": sps, "paper_st_cnn": {"params": paper_params, "steps_per_sec": paper_sps,
                                             "minor_page_faults_per_step": paper_faults}})


if __name__ == "__main__":
  xla_cpu.restart_with_huge_pages()
  main()
