"""scripts.bench.readme_tables: the README's benchmark block is what the result files say."""

import os

import pytest

from scripts.bench import readme_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _paper(cpu, flags_on, stnjax_s, torch_s, glibc_tunables="glibc.malloc.hugetlb=1"):
  return {"provenance": {"cpu_model": cpu, "cpu_count": 2, "jax": "0.10.2",
                         "glibc_tunables": glibc_tunables},
          "xla_cpu_flags_in_effect": flags_on, "devices": 2, "torch": "2.13.0+cpu (cpu, 2 threads)",
          "rows": [{"workload": "RTS cnn", "batch": b,
                    "seconds_per_step": {"stnjax_1": 9.0, "stnjax_2": stnjax_s, "torch": torch_s}}
                   for b in (256, 128)]}


def _sampler(cpu, cpus, ratio, xla_flags=None):
  return {"provenance": {"cpu_model": cpu, "cpu_count": 2, "cpus_available": cpus,
                         "jax": "0.10.2", "xla_flags": xla_flags},
          "rows": [{"shape": "256x28x28x1", "workload": w, "ratio_torch_over_stnjax": ratio}
                   for w in readme_tables.SAMPLER_WORKLOADS]}


def test_block_per_cpu_model_from_the_data_parallel_column():
  text = readme_tables.block(
      [("a.json", _paper("Intel Xeon", True, 0.5, 0.25)),
       ("off.json", _paper("Intel Xeon", False, 0.1, 0.9)),  # Flags off: not how we train.
       ("glibc.json", _paper("Intel Xeon", True, 0.1, 0.9, "")),  # Nor glibc's defaults.
       ("b.json", _paper("AMD EPYC", True, 0.2, 0.3)),
       ("p_halt_poll.json", _paper("AMD EPYC", True, 0.1, 0.9))],  # The machine changed.
      [("s2.json", _sampler("AMD EPYC", 2, 0.5)), ("s1.json", _sampler("AMD EPYC", 1, 1.25)),
       ("flags.json", _sampler("AMD EPYC", 2, 9.0, xla_flags="--xla_cpu_prefer_vector_width=512")),
       ("s_halt_poll.json", _sampler("AMD EPYC", 2, 9.0))])
  amd, intel = text.split("**Intel Xeon**")
  assert "**AMD EPYC**" in amd and "off.json" not in text and "glibc.json" not in text
  assert "flags.json" not in text  # The sampler table: the library as imported.
  assert "halt_poll" not in text  # Nor runs with the idle CPUs' setting changed.
  assert "| RTS cnn | 0.500 | 0.250 | 0.50 | 0.500 | 0.250 | 0.50 |" in intel
  assert ("Training step, SGD, on 2 CPU(s): stnjax on 2 device(s), torch on 2 thread(s) "
          "(`a.json`):") in intel
  assert "| RTS cnn | 0.200 | 0.300 | 1.50 | 0.200 | 0.300 | 1.50 |" in amd
  rows = [line for line in amd.splitlines() if line.startswith("| 256x28x28x1")]
  assert rows == ["| 256x28x28x1 | 2 | 0.50 | 0.50 | 0.50 | 0.50 |",
                  "| 256x28x28x1 | 1 | 1.25 | 1.25 | 1.25 | 1.25 |"]


def test_readme_block_matches_the_committed_results():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  expected = readme_tables.block(readme_tables.load("results/bench/paper_models_*.json"),
                                 readme_tables.load("results/bench/sampler_*.json"))
  assert readme_tables.replace_block(readme, expected) == readme


def test_replace_block_needs_the_markers():
  with pytest.raises(ValueError, match="bench:begin"):
    readme_tables.replace_block("no markers", "x")
