"""Training-step time of the paper-size models (~400k parameters): stnjax/flax vs PyTorch.

  python -m scripts.bench.bench_paper_models --out results/bench/paper_models.json
      [--layouts R,RTS] [--models cnn,st_cnn_aff] [--batch_sizes 256,128]
      [--rounds 5] [--steps 5] [--warmup 2] [--torch_threads N] [--cpu_devices N]

One row per layout (R: 28x28x1, RTS: 42x42x1) x model x batch size. A
training step is: forward, softmax cross-entropy, backward and a plain SGD
update (lr 0.01) on one fixed random batch.

* stnjax: `models.create_model(name, shape, 10, param_budget=400_000,
  st_pool=..., padding=...)` with the padding and `st_pool` of the `cpu`
  preset of experiments/configs/distorted_mnist.py, so the benchmark follows
  the reproduction's layout. The step is one jitted function with the state
  donated, timed on one device and, with several devices, data parallel over
  all of them as `stnjax.train` trains (batch sharded, state replicated,
  `jax.shard_map` with one flat all-reduce of the gradients,
  `train.all_reduce_mean`; as bench_train's data-parallel row). On a CPU the
  device count is `--cpu_devices` (default `JAX_NUM_CPU_DEVICES`, else one per
  core, as bench_train).
* torch: the same networks written in torch (NCHW), built from the flax
  module's attributes: same convolution padding per layer, ceil-mode max
  pools, 'SAME' average pools (a partial window divided by the full window
  size, as flax's `avg_pool`), `affine_grid` / `grid_sample` with
  `align_corners=False`, identity-initialised regression layer, same width.
  The parameter counts are asserted equal, and before timing the two models
  with the same weights (flax's copied into torch) must give the same logits
  on a batch of 4 (transform parameters perturbed off the identity, so the
  sampler is exercised): the two are the same network.

Timing: `--warmup` untimed steps each (compilation), then `--rounds`
interleaved rounds (the implementations take turns, so machine noise hits
them alike), each the median of `--steps` timed, synchronised steps; the
table gives the median over rounds and torch_s / stnjax_s (> 1: stnjax
faster). The script restarts itself with glibc's huge-page tunable, as the
training scripts do (`stnjax.xla_cpu.restart_with_huge_pages`; `GLIBC_TUNABLES=
python -m ...` keeps glibc's defaults; recorded in the provenance). `stnjax.xla_cpu.configure()`
runs first, as in the training scripts, for `--cpu_devices` devices (so the
one-device column runs under the data-parallel flags too; `--xla_cpu_flags
off`: without any).
"""

import argparse
import importlib.util
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scripts.bench import bench_train
from scripts.bench import timing
from stnjax import models
from stnjax import train
from stnjax import xla_cpu
from stnjax.data import variants

CONFIG_FILE = timing.ROOT / "experiments" / "configs" / "distorted_mnist.py"
PARAM_BUDGET = 400_000
NUM_CLASSES = 10
LR = 0.01
CHECK_BATCH = 4
CHECK_TOL = 1e-4


def load_config_module():
  """experiments/configs/distorted_mnist.py as a module (as scripts/reproduce.py loads it)."""
  spec = importlib.util.spec_from_file_location("distorted_mnist", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def create_stnjax_model(name, layout, config_module=None):
  """The paper-size flax model for `layout` with the `cpu` preset's padding and st_pool."""
  config_module = config_module or load_config_module()
  config = config_module.get_config(f"model={name},data={layout},preset=cpu")
  shape = variants.get_variant(layout).shape
  model = models.create_model(name, shape, NUM_CLASSES, param_budget=PARAM_BUDGET,
                              st_pool=config.model.st_pool, padding=config.model.padding)
  return model, shape


# --- The same networks in torch (NCHW), built from the flax modules' attributes.


def _conv(in_ch, out_ch, kernel, padding, size):
  """A torch Conv2d padded as flax pads it on a `size` (H, W) map, and its output size."""
  if padding not in ("VALID", "SAME"):
    raise ValueError(f"unresolved padding {padding!r}")
  if any(k % 2 == 0 for k in kernel):  # Flax's 'SAME' pads even kernels asymmetrically.
    raise ValueError(f"odd kernels only, got {kernel}")
  pad = tuple(k // 2 for k in kernel) if padding == "SAME" else (0, 0)
  out = tuple(n if padding == "SAME" else n - k + 1 for n, k in zip(size, kernel))
  return torch.nn.Conv2d(in_ch, out_ch, tuple(kernel), padding=pad), out


def _pool_size(size, window):
  return tuple(-(-n // window) for n in size)  # 'SAME' / ceil mode.


def _max_pool(x):
  return F.max_pool2d(x, 2, stride=2, ceil_mode=True)  # Flax 'SAME' max pool = ceil mode.


def _avg_pool(x, window):
  # Flax's 'SAME' avg_pool pads with zeros and divides every window by its
  # full size (count_include_pad); torch's ceil-mode overhang is not padding,
  # so the divisor is given explicitly.
  return F.avg_pool2d(x, window, stride=window, ceil_mode=True,
                      divisor_override=window * window)


class TorchCNN(torch.nn.Module):
  """`models.CNN`: Conv -> ReLU -> maxpool 2 per layer, flatten, Linear."""

  def __init__(self, flax_cnn, in_shape):
    super().__init__()
    size, ch = tuple(in_shape[:2]), in_shape[2]
    self.convs = torch.nn.ModuleList()
    for f, k in zip(flax_cnn.features, flax_cnn.kernel_sizes):
      # The same per-layer rule as the flax CNN ("VALID_MIN2").
      padding = models._classifier_padding(  # pylint: disable=protected-access
          flax_cnn.padding, size, k)
      conv, size = _conv(ch, f, k, padding, size)
      self.convs.append(conv)
      size, ch = _pool_size(size, 2), f
    self.flat_shape = (ch,) + size  # (C, H, W) of the flattened map.
    self.dense = torch.nn.Linear(ch * size[0] * size[1], flax_cnn.num_classes)

  def forward(self, x):
    for conv in self.convs:
      x = _max_pool(F.relu(conv(x)))
    return self.dense(x.flatten(1))


class TorchConvLocalisation(torch.nn.Module):
  """`models.ConvLocalisation`: avgpool, Conv -> ReLU with a maxpool between, Linear -> ReLU."""

  def __init__(self, flax_loc, in_shape):
    super().__init__()
    self.downsample = flax_loc.downsample
    size, ch = tuple(in_shape[:2]), in_shape[2]
    if self.downsample > 1:
      size = _pool_size(size, self.downsample)
    self.convs = torch.nn.ModuleList()
    for i, f in enumerate(flax_loc.features):
      if i:
        size = _pool_size(size, 2)
      conv, size = _conv(ch, f, flax_loc.kernel_size, flax_loc.padding, size)
      self.convs.append(conv)
      ch = f
    self.flat_shape = (ch,) + size
    self.dense = torch.nn.Linear(ch * size[0] * size[1], flax_loc.dense)

  def forward(self, x):
    if self.downsample > 1:
      x = _avg_pool(x, self.downsample)
    for i, conv in enumerate(self.convs):
      if i:
        x = _max_pool(x)
      x = F.relu(conv(x))
    return F.relu(self.dense(x.flatten(1)))


class TorchSTCNN(torch.nn.Module):
  """`models.STClassifier` with one affine transformer and a CNN classifier."""

  def __init__(self, flax_st, in_shape):
    super().__init__()
    (st,) = flax_st.transformers
    if st.transform != "affine" or st.align_corners or st.padding_mode != "zeros":
      raise ValueError("only one affine transformer, align_corners=False, zeros padding")
    self.loc = TorchConvLocalisation(st.localisation, in_shape)
    self.regression = torch.nn.Linear(st.localisation.dense, 6)
    with torch.no_grad():  # Identity-initialised, as in the flax model.
      self.regression.weight.zero_()
      self.regression.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
    self.pool = flax_st.pool
    self.classifier = TorchCNN(flax_st.classifier,
                               _pool_size(in_shape[:2], self.pool) + (in_shape[2],))

  def forward(self, x):
    theta = self.regression(self.loc(x)).view(-1, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if self.pool > 1:
      y = _avg_pool(y, self.pool)
    return self.classifier(y)


def torch_model(flax_model, in_shape):
  if isinstance(flax_model, models.CNN):
    return TorchCNN(flax_model, in_shape)
  if isinstance(flax_model, models.STClassifier) and isinstance(flax_model.classifier, models.CNN):
    return TorchSTCNN(flax_model, in_shape)
  raise ValueError(f"no torch version of {type(flax_model).__name__}")


# --- Weight copy (flax -> torch), for the equivalence check.


def _t(a):
  return torch.from_numpy(np.array(a, np.float32))


def _copy_conv(p, conv):
  conv.weight.copy_(_t(p["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW.
  conv.bias.copy_(_t(p["bias"]))


def _copy_dense(p, linear, feature_map=None):
  """Flax Dense -> torch Linear; `feature_map` (C, H, W) when its input is a flattened map."""
  kernel = _t(p["kernel"])  # (in, out)
  if feature_map is not None:  # Flax flattens (H, W, C), torch (C, H, W).
    c, h, w = feature_map
    kernel = kernel.reshape(h, w, c, -1).permute(2, 0, 1, 3).reshape(c * h * w, -1)
  linear.weight.copy_(kernel.T)
  linear.bias.copy_(_t(p["bias"]))


def _copy_convs_and_dense(p, net):
  for i, conv in enumerate(net.convs):
    _copy_conv(p[f"Conv_{i}"], conv)
  _copy_dense(p["Dense_0"], net.dense, net.flat_shape)


@torch.no_grad()
def copy_flax_params(params, net):
  """Copies flax `params` into the torch `net` (the same architecture)."""
  if isinstance(net, TorchCNN):
    _copy_convs_and_dense(params, net)
  else:
    st = params["transformers_0"]
    _copy_convs_and_dense(st["localisation"], net.loc)
    _copy_dense(st["regression"], net.regression)
    _copy_convs_and_dense(params["classifier"], net.classifier)


def torch_param_count(net):
  return sum(p.numel() for p in net.parameters())


def random_params(model, in_shape, seed=0, regression_noise=0.0):
  """Parameters of `model` drawn with numpy: fan-in scaled normal kernels, small biases.

  The regression layer sits at the identity transform (as flax initialises
  it) plus `regression_noise` times a standard normal. The values do not
  change a step's work, and drawing them on the host saves compiling
  `model.init` (seconds for these models).
  """
  x = jax.ShapeDtypeStruct((1,) + tuple(in_shape), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    names = [getattr(k, "key", None) for k in path]
    if "regression" in names:
      base = 0.0 if names[-1] == "kernel" else models.identity_params("affine").reshape(-1)
      return jnp.asarray(base + regression_noise * rng.standard_normal(s.shape), jnp.float32)
    scale = 1.0 / np.sqrt(np.prod(s.shape[:-1])) if names[-1] == "kernel" else 0.1
    return jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def check_same_network(flax_model, net, in_shape, seed=0):
  """Max |logits difference| of the two models with the same weights, and max |logit|.

  The flax model's weights are copied into torch. The regression layer is
  perturbed off the identity so that the transformer samples off the pixel
  grid.
  """
  params = random_params(flax_model, in_shape, seed, regression_noise=0.1)
  x = np.random.default_rng(seed).random((CHECK_BATCH,) + tuple(in_shape), dtype=np.float32)
  flax_logits = np.asarray(jax.jit(flax_model.apply)({"params": params}, jnp.asarray(x)))
  copy_flax_params(params, net)
  with torch.no_grad():
    torch_logits = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  return float(np.max(np.abs(flax_logits - torch_logits))), float(np.max(np.abs(flax_logits)))


# --- Training steps (callables that run one synchronised step).


def stnjax_step(model, params, x, y, mesh=None):
  """One jitted, donated SGD step of `model` on the fixed batch `(x, y)` (a callable).

  With `mesh` (1-D, axis "data"), data parallel as `stnjax.train`: the batch
  sharded, the state replicated, each device's gradient averaged in one
  all-reduce of one flat vector (`train.all_reduce_mean`).
  """
  tx = optax.sgd(LR)
  params = jax.tree.map(jnp.array, params)  # A copy: the step donates it.
  state = (params, tx.init(params))

  def grads_of(params, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return jax.grad(loss_fn)(params)

  def apply_update(state, grads):
    params, opt_state = state
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  if mesh is None:
    def train_step(state, x, y):
      return apply_update(state, grads_of(state[0], x, y))
  else:
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))

    def device_step(state, x, y):  # On one device's part of the batch.
      # Per-device gradients of the replicated parameters, one all-reduce.
      grads = grads_of(jax.lax.pcast(state[0], "data", to="varying"), x, y)
      return apply_update(state, train.all_reduce_mean(grads, "data"))

    train_step = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                               out_specs=P())
  train_step = jax.jit(train_step, donate_argnums=0)
  holder = [state]

  def step():
    holder[0] = jax.block_until_ready(train_step(holder[0], x, y))

  step.state = lambda: holder[0]  # (params, opt_state), for tests.
  return step


def torch_step(net, x, y):
  """One synchronised SGD step of the torch `net` on the fixed batch `(x, y)` (a callable)."""
  device = bench_train.TORCH_DEVICE
  net = net.train().to(device)
  x, y = x.to(device), y.to(device)
  opt = torch.optim.SGD(net.parameters(), lr=LR)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step():
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    sync()

  return step


def time_row(steps_by_impl, warmup, steps, rounds):
  """Median s/step per implementation over interleaved rounds, and every round's s/step."""
  for step in steps_by_impl.values():  # Compile / warm up each before any timing.
    for _ in range(warmup):
      step()
  # bench_train's interleaved rounds (each round: the median of `steps` steps).
  _, sps = bench_train.interleaved_steps_per_sec(steps_by_impl, 0, steps, rounds)
  per_round = {name: [1.0 / v for v in values] for name, values in sps.items()}
  return {name: statistics.median(v) for name, v in per_round.items()}, per_round


def _csv(text):
  return [t for t in text.split(",") if t]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layouts", type=_csv, default=["R", "RTS"])
  parser.add_argument("--models", type=_csv, default=["cnn", "st_cnn_aff"])
  parser.add_argument("--batch_sizes", type=lambda s: [int(b) for b in _csv(s)],
                      default=[256, 128])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
  parser.add_argument("--torch_threads", type=int, default=os.cpu_count())
  # A set JAX_NUM_CPU_DEVICES wins (it is how the training is run); 0 leaves
  # JAX's device count alone (needed once JAX has started, e.g. in tests).
  parser.add_argument("--cpu_devices", "--cpu-devices", type=int,
                      default=timing.default_cpu_devices(),
                      help="CPU devices for the data-parallel column (0: JAX's default)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--xla_cpu_flags", choices=("on", "off"), default="on",
                      help="on: stnjax.xla_cpu.configure() first, as the training scripts do")
  parser.add_argument("--out", default=None, help="JSON file for the results (optional)")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.xla_cpu_flags == "on":
    xla_cpu.configure(args.cpu_devices)  # Before the backend starts, as experiments/train.py.
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # Before the backend starts.
  torch.set_num_threads(args.torch_threads)
  n_dev = jax.device_count()
  mesh = (jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
          if n_dev > 1 else None)
  config_module = load_config_module()
  rng = np.random.default_rng(args.seed)
  load_before = os.getloadavg()[0]
  rows, checks = [], []
  for layout in args.layouts:
    for name in args.models:
      model, shape = create_stnjax_model(name, layout, config_module)
      net = torch_model(model, shape)
      params_stnjax = models.count_params(model, shape)
      params_torch = torch_param_count(net)
      width = (model.classifier if isinstance(model, models.STClassifier) else model).features[0]
      st_pool = model.pool if isinstance(model, models.STClassifier) else 1
      padding = (model.classifier if isinstance(model, models.STClassifier) else model).padding
      workload = f"{layout} {name}"
      print(f"{workload}: {shape[0]}x{shape[1]}x{shape[2]}, width {width}, padding {padding}, "
            f"st_pool {st_pool}; params stnjax {params_stnjax:,}, torch {params_torch:,}",
            flush=True)
      assert params_torch == params_stnjax, (workload, params_stnjax, params_torch)
      max_diff, max_logit = check_same_network(model, net, shape, args.seed)
      print(f"  same weights, batch {CHECK_BATCH}: max |logits diff| {max_diff:.2e} "
            f"(max |logit| {max_logit:.2f})", flush=True)
      assert max_diff <= CHECK_TOL * max(1.0, max_logit), (workload, max_diff)
      checks.append({"workload": workload, "max_abs_logit_diff": max_diff,
                     "max_abs_logit": max_logit})
      params = random_params(model, shape, args.seed)
      for batch in args.batch_sizes:
        x = rng.random((batch,) + shape, dtype=np.float32)
        y = rng.integers(0, NUM_CLASSES, batch)
        xj, yj = jnp.asarray(x), jnp.asarray(y, jnp.int32)
        torch.manual_seed(args.seed)
        impls = {"stnjax_1": stnjax_step(model, params, xj, yj)}
        if mesh is not None and batch % n_dev == 0:
          impls[f"stnjax_{n_dev}"] = stnjax_step(model, params, xj, yj, mesh)
        impls["torch"] = torch_step(torch_model(model, shape),
                                    torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                                    torch.from_numpy(y))
        seconds, per_round = time_row(impls, args.warmup, args.steps, args.rounds)
        ratios = {f"torch_over_{k}": seconds["torch"] / v for k, v in seconds.items()
                  if k != "torch"}
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:.4f} s/step" for k, v in seconds.items())
              + ", " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
        rows.append({"workload": workload, "layout": layout, "model": name,
                     "input_shape": list(shape), "padding": padding, "st_pool": st_pool,
                     "width": width, "params": params_stnjax, "params_torch": params_torch,
                     "batch": batch,
                     "seconds_per_step": seconds, "seconds_per_step_per_round": per_round,
                     **ratios})
  torch_info = (f"{torch.__version__} ({bench_train.TORCH_DEVICE}, "
                f"{torch.get_num_threads()} threads)")
  print(f"\njax {jax.__version__} on {n_dev} {jax.devices()[0].platform} device(s); torch "
        f"{torch_info}; {timing.cpu_model()}, {os.cpu_count()} CPUs; load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.rounds} rounds of "
        f"{args.steps} steps (median); stnjax.xla_cpu flags in effect: {xla_cpu.in_effect()}\n")
  # The data-parallel column: "-" where there is one device (or the batch does not split).
  dp = f"stnjax_{n_dev}" if n_dev > 1 else None
  dp_name = f"stnjax {n_dev} devices" if dp else "stnjax data parallel"
  print(f"| workload | params | batch | stnjax 1 device s/step | {dp_name} s/step | torch s/step | "
        f"torch / stnjax 1 device | torch / {dp_name} |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    s = r["seconds_per_step"]
    dp_s = f"{s[dp]:.4f}" if dp in s else "-"
    dp_ratio = f"{r['torch_over_' + dp]:.2f}" if dp in s else "-"
    print(f"| {r['workload']} | {r['params']:,} | {r['batch']} | {s['stnjax_1']:.4f} | {dp_s} | "
          f"{s['torch']:.4f} | {r['torch_over_stnjax_1']:.2f} | {dp_ratio} |")
  results = {"xla_cpu_flags_in_effect": xla_cpu.in_effect(),
             "param_budget": PARAM_BUDGET, "lr": LR, "rounds": args.rounds, "steps": args.steps,
             "warmup": args.warmup, "devices": n_dev, "torch": torch_info,
             "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
             "equivalence_checks": checks, "rows": rows}
  timing.write_results(args.out, results)
  return results


if __name__ == "__main__":
  xla_cpu.restart_with_huge_pages()
  main()
