"""Every benchmark file behind the README's speed tables and docs/performance.md, for this CPU.

  python -m scripts.bench.per_cpu [--only NAME,...] [--max_load 0.5] [--dry_run]

Runs each benchmark in `JOBS` in a process of its own, one after another,
with the arguments that made the files already under `results/bench/`, and
writes `results/bench/<name>.json` with this machine's CPU model in the
name (`cpu_slug`: "AMD EPYC" -> `sampler_amd_epyc.json`); then rewrites the
README's tables (`readme_tables`, which groups the files by CPU model).
Before each benchmark it waits for the 1-minute load average to fall below
--max_load: a timing needs a quiet machine. One-core jobs run pinned to the
first CPU this process may use, with `OMP_NUM_THREADS=1` for torch; a job
may set environment variables of its own (`Job.env`: glibc's defaults for
the comparison run of the paper models), and on a KVM guest with Linux's
`haltpoll` idle driver how long an idle CPU polls before it halts
(`Job.guest_halt_poll_ns`, as root; restored afterwards): the same machine
with idle CPUs that wake quickly. A failed benchmark is reported and the
rest still run (exit status 1).

Each file's provenance names the commit; files of a CPU already measured are
overwritten, so the tree is modified ("-dirty") for the jobs after the
first: commit, or run the jobs one by one with --only, to keep it clean.
"""

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import NamedTuple

from scripts.bench import readme_tables
from scripts.bench import timing


class Job(NamedTuple):
  """One benchmark run: `python -m scripts.bench.<module> <args> --out <file>`."""
  prefix: str  # The file name before the CPU slug ...
  suffix: str  # ... and after it.
  module: str
  args: tuple[str, ...]
  one_core: bool = False
  env: tuple[tuple[str, str], ...] = ()  # Environment variables set for the run.
  # The haltpoll driver's guest_halt_poll_ns for the run (None: as the machine has it).
  guest_halt_poll_ns: int | None = None

  def name(self) -> str:
    return self.prefix + self.suffix

  def out(self, slug: str) -> str:
    return f"results/bench/{self.prefix}_{slug}{self.suffix}.json"


# Linux's default for the haltpoll driver (drivers/cpuidle/cpuidle-haltpoll.c).
HALT_POLL_NS = 200_000
HALT_POLL_PARAMETER = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"

JOBS = (
    Job("paper_models", "", "bench_paper_models", ("--rounds", "7", "--steps", "3")),
    Job("paper_models", "_xla_flags_off", "bench_paper_models",
        ("--rounds", "7", "--steps", "3", "--xla_cpu_flags", "off")),
    Job("paper_models", "_glibc_defaults", "bench_paper_models", ("--rounds", "7", "--steps", "3"),
        env=(("GLIBC_TUNABLES", ""),)),
    Job("paper_models", readme_tables.HALT_POLL_SUFFIX, "bench_paper_models",
        ("--rounds", "7", "--steps", "3"), guest_halt_poll_ns=HALT_POLL_NS),
    Job("paper_models_tc", "", "bench_paper_models",
        ("--layouts", "TC", "--rounds", "7", "--steps", "3")),
    # One core each, at one device's share of the batch: how the step compares per core.
    Job("paper_models", "_one_core_b64", "bench_paper_models",
        ("--cpu_devices", "1", "--torch_threads", "1", "--batch_sizes", "64", "--rounds", "7",
         "--steps", "3"), one_core=True),
    Job("sampler", "", "bench_sampler", ()),
    Job("sampler", "_one_core", "bench_sampler", (), one_core=True),
    Job("sampler", "_xla_cpu_flags", "bench_sampler", ("--xla_cpu_flags", "on")),
    # Idle CPUs that poll for Linux's default 200 us before halting.
    Job("sampler", readme_tables.HALT_POLL_SUFFIX, "bench_sampler", (),
        guest_halt_poll_ns=HALT_POLL_NS),
    Job("sampler", "_one_core_xla_cpu_flags", "bench_sampler", ("--xla_cpu_flags", "on"),
        one_core=True),
    # How XLA emits the sampler's gathers (no timing).
    Job("loop_anatomy_sampler", "", "loop_anatomy", ()),
    Job("loop_anatomy_sampler", "_xla_cpu_flags", "loop_anatomy", ("--xla_cpu_flags", "on")),
    Job("loop_overhead", "", "bench_loop_overhead", ()),
    Job("loop_overhead", "_one_core", "bench_loop_overhead", (), one_core=True),
    Job("loop_overhead", readme_tables.HALT_POLL_SUFFIX, "bench_loop_overhead", (),
        guest_halt_poll_ns=HALT_POLL_NS),
    Job("ablations_sampler", "", "bench_ablations", ("--rows", "256x", "--rounds", "9")),
    Job("ablations_conv", "", "bench_ablations",
        ("--rows", "conv ", "--rounds", "3", "--repeats", "3", "--xla_cpu_flags", "off")),
    Job("ablations_conv", "_xla_flags_on", "bench_ablations",
        ("--rows", "conv ", "--rounds", "3", "--repeats", "3", "--xla_cpu_flags", "on")),
    Job("ablations_conv_fft", "", "bench_ablations",
        ("--rows", "conv 7x7 86->86", "--xla_cpu_flags", "on")),
    Job("ablations_max_pool", "", "bench_ablations", ("--rows", "max_pool")),
    Job("data", "", "bench_data", ()),
    Job("profile_step_r_cnn", "", "profile_step",
        ("--layout", "R", "--model", "cnn", "--batch", "128", "--steps", "10", "--top", "6")),
    Job("profile_step_r_cnn", "_one_core_b64", "profile_step",
        ("--layout", "R", "--model", "cnn", "--batch", "64", "--cpu_devices", "1", "--steps", "10",
         "--top", "6"), one_core=True),
    Job("profile_step_rts_cnn", "_one_core_b64", "profile_step",
        ("--layout", "RTS", "--model", "cnn", "--batch", "64", "--cpu_devices", "1", "--top", "12"),
        one_core=True),
)


def cpu_slug(model: str) -> str:
  """A CPU model name as a file-name part: lower case, words joined by "_", no marks or clock.

  "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz" -> "intel_xeon_platinum_8481c";
  "AMD EPYC 7B13 64-Core Processor" -> "amd_epyc_7b13".
  """
  text = re.sub(r"@.*$", " ", model)
  text = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|\b\d+-core\b", " ", text, flags=re.IGNORECASE)
  return "_".join(re.findall(r"[a-z0-9]+", text.lower())) or "unknown_cpu"


def command(job: Job, slug: str) -> list[str]:
  return ["python", "-m", f"scripts.bench.{job.module}", *job.args, "--out", job.out(slug)]


def shell_line(job: Job, slug: str, cpu: int) -> str:
  """The command as one would type it in a shell."""
  prefix = f"OMP_NUM_THREADS=1 taskset -c {cpu} " if job.one_core else ""
  prefix += "".join(f"{name}={shlex.quote(value)} " for name, value in job.env)
  if job.guest_halt_poll_ns is not None:
    prefix = f"(with {HALT_POLL_PARAMETER} = {job.guest_halt_poll_ns}) " + prefix
  return prefix + shlex.join(command(job, slug))


def wait_for_quiet(max_load: float, poll_seconds: float = 10.0) -> None:
  while os.getloadavg()[0] >= max_load:
    time.sleep(poll_seconds)


def run(job: Job, slug: str, cpu: int, max_load: float) -> bool:
  """Runs `job` once the machine is quiet; returns whether it succeeded."""
  wait_for_quiet(max_load)
  print(f"\n== {job.name()}: {shell_line(job, slug, cpu)}", flush=True)
  argv = [sys.executable, *command(job, slug)[1:]]
  env = dict(os.environ, **dict(job.env), **({"OMP_NUM_THREADS": "1"} if job.one_core else {}))
  pin = (lambda: os.sched_setaffinity(0, {cpu})) if job.one_core else None
  benchmark = lambda: subprocess.run(argv, cwd=timing.ROOT, env=env, preexec_fn=pin,
                                     check=False).returncode == 0
  if job.guest_halt_poll_ns is None:
    return benchmark()
  parameter = pathlib.Path(HALT_POLL_PARAMETER)
  try:
    machine_value = parameter.read_text(encoding="ascii").strip()
    parameter.write_text(str(job.guest_halt_poll_ns), encoding="ascii")
  except OSError as error:
    print(f"{job.name()} needs to set {HALT_POLL_PARAMETER} (root, a KVM guest with the "
          f"haltpoll idle driver): {error}", file=sys.stderr)
    return False
  try:
    return benchmark()
  finally:
    parameter.write_text(machine_value, encoding="ascii")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="",
                      help="comma-separated job names (default: all): "
                           + ", ".join(job.name() for job in JOBS))
  parser.add_argument("--max_load", type=float, default=0.5,
                      help="wait for a 1-minute load average below this before each job")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  args = parser.parse_args(argv)
  if args.max_load <= 0:
    parser.error(f"--max_load must be > 0 (a load average), got {args.max_load}")
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - {job.name() for job in JOBS})
  if unknown:
    parser.error(f"--only: unknown job(s) {unknown}; known: {[job.name() for job in JOBS]}")
  args.jobs = [job for job in JOBS if not names or job.name() in names]
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  slug = cpu_slug(timing.cpu_model())
  cpu = min(os.sched_getaffinity(0))
  if args.dry_run:
    for job in args.jobs:
      print(shell_line(job, slug, cpu))
    return 0
  failed = [job.name() for job in args.jobs if not run(job, slug, cpu, args.max_load)]
  readme_tables.main(["--readme", str(timing.ROOT / "README.md")])
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
