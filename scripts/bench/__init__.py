"""Benchmarks of stnjax against its alternatives; each writes JSON under results/bench/.

Run them from the repository root as modules (no `sys.path` edits):

  python -m scripts.bench.bench_sampler --out results/bench/sampler.json
  python -m scripts.bench.bench_ablations --out results/bench/ablations.json
  python -m scripts.bench.bench_train --out results/bench/train.json
  python -m scripts.bench.bench_data --out results/bench/data.json
"""
