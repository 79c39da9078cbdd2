"""The per-CPU benchmark suite (`scripts/bench/per_cpu.py`)."""

import glob
import json
import os

import pytest

from scripts.bench import per_cpu
from scripts.bench import timing


@pytest.mark.parametrize("model, slug", [
    ("AMD EPYC", "amd_epyc"),
    ("AMD EPYC 7B13 64-Core Processor", "amd_epyc_7b13"),
    ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "intel_xeon_platinum_8481c"),
    ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "intel_core_i7_8700"),
    ("(R)", "unknown_cpu"),
])
def test_cpu_slug(model, slug):
  assert per_cpu.cpu_slug(model) == slug


def test_jobs_reproduce_the_committed_results_commands():
  """Each committed file under results/bench/ is one job's output, made by that job's command.

  A CPU need not have every job's file: a job may be newer than its run.
  """
  files = sorted(os.path.relpath(p, timing.ROOT)
                 for p in glob.glob(os.path.join(timing.ROOT, "results/bench/*.json")))
  assert any("_amd_epyc" in path for path in files)
  for path in files:
    provenance = json.load(open(os.path.join(timing.ROOT, path), encoding="utf-8"))["provenance"]
    slug = per_cpu.cpu_slug(provenance["cpu_model"])  # The file's CPU names it, as per_cpu does.
    job = next((j for j in per_cpu.JOBS if j.out(slug) == path), None)
    assert job is not None, path
    assert provenance["command"] == " ".join(per_cpu.command(job, slug)), path
    assert (provenance["cpus_available"] == 1) == job.one_core, path
    if "GLIBC_TUNABLES" in dict(job.env):
      assert provenance["glibc_tunables"] == dict(job.env)["GLIBC_TUNABLES"], path
    if job.guest_halt_poll_ns is not None:
      assert provenance["cpu_idle"]["guest_halt_poll_ns"] == job.guest_halt_poll_ns, path


def test_only_rejects_an_unknown_job_name(capsys):
  with pytest.raises(SystemExit):
    per_cpu.parse_args(["--only", "sampler,samplers"])
  assert "samplers" in capsys.readouterr().err


def test_max_load_must_be_positive(capsys):
  with pytest.raises(SystemExit):
    per_cpu.parse_args(["--max_load", "0"])
  assert "--max_load must be > 0" in capsys.readouterr().err


def test_dry_run_prints_the_commands_with_the_cpu_in_the_file_names(monkeypatch, capsys):
  monkeypatch.setattr(timing, "cpu_model", lambda: "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})
  assert per_cpu.main(["--dry_run", "--only", "sampler_one_core,ablations_conv_fft"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      "OMP_NUM_THREADS=1 taskset -c 3 python -m scripts.bench.bench_sampler "
      "--out results/bench/sampler_intel_xeon_gold_6338_one_core.json",
      "python -m scripts.bench.bench_ablations --rows 'conv 7x7 86->86' --xla_cpu_flags on "
      "--out results/bench/ablations_conv_fft_intel_xeon_gold_6338.json",
  ]


def test_run_pins_one_core_jobs_and_waits_for_a_quiet_machine(monkeypatch):
  calls, loads = [], iter([2.0, 0.9, 0.1])
  monkeypatch.setattr(os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
  monkeypatch.setattr(per_cpu.time, "sleep", lambda s: None)

  class Done:
    returncode = 0

  def fake_run(argv, **kwargs):
    calls.append((argv, kwargs))
    return Done()

  monkeypatch.setattr(per_cpu.subprocess, "run", fake_run)
  job = next(j for j in per_cpu.JOBS if j.name() == "loop_overhead_one_core")
  assert per_cpu.run(job, "amd_epyc", 1, max_load=0.5)
  (argv, kwargs), = calls
  assert argv[1:] == ["-m", "scripts.bench.bench_loop_overhead",
                      "--out", "results/bench/loop_overhead_amd_epyc_one_core.json"]
  assert kwargs["env"]["OMP_NUM_THREADS"] == "1"
  assert kwargs["preexec_fn"] is not None
  with pytest.raises(StopIteration):  # All three load readings were taken: it waited twice.
    next(loads)


def test_a_job_with_environment_settings_runs_and_prints_with_them(monkeypatch, capsys):
  calls = []

  class Done:
    returncode = 0

  monkeypatch.setattr(per_cpu.subprocess, "run", lambda argv, **kw: calls.append(kw) or Done())
  monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
  job = next(j for j in per_cpu.JOBS if j.name() == "paper_models_glibc_defaults")
  assert per_cpu.run(job, "amd_epyc", 0, max_load=0.5)
  [kwargs] = calls
  assert kwargs["env"]["GLIBC_TUNABLES"] == ""
  assert "OMP_NUM_THREADS" not in kwargs["env"] and kwargs["preexec_fn"] is None  # Not one-core.
  assert capsys.readouterr().out.splitlines()[-1].startswith(
      "== paper_models_glibc_defaults: GLIBC_TUNABLES='' python -m scripts.bench.bench_paper_models")


def test_a_halt_poll_job_sets_the_parameter_for_its_run_and_restores_it(monkeypatch, tmp_path):
  parameter = tmp_path / "guest_halt_poll_ns"
  parameter.write_text("0\n")
  monkeypatch.setattr(per_cpu, "HALT_POLL_PARAMETER", str(parameter))
  monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
  seen = []

  class Done:
    returncode = 0

  monkeypatch.setattr(per_cpu.subprocess, "run",
                      lambda argv, **kw: seen.append(parameter.read_text()) or Done())
  job = next(j for j in per_cpu.JOBS if j.name() == "sampler_halt_poll")
  assert per_cpu.run(job, "intel_xeon", 0, max_load=0.5)
  assert seen == [str(per_cpu.HALT_POLL_NS)]
  assert parameter.read_text() == "0"


def test_a_halt_poll_job_fails_clearly_without_the_parameter(monkeypatch, tmp_path, capsys):
  monkeypatch.setattr(per_cpu, "HALT_POLL_PARAMETER", str(tmp_path / "missing"))
  monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
  monkeypatch.setattr(per_cpu.subprocess, "run", lambda *a, **kw: pytest.fail("ran anyway"))
  job = next(j for j in per_cpu.JOBS if j.name() == "loop_overhead_halt_poll")
  assert not per_cpu.run(job, "intel_xeon", 0, max_load=0.5)
  assert "loop_overhead_halt_poll needs to set" in capsys.readouterr().err
