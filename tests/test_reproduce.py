"""scripts/reproduce.py and scripts/make_table.py end to end on the tiny `preset=test` config."""

import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import make_table  # pylint: disable=g-import-not-at-top,wrong-import-position
import reproduce  # pylint: disable=g-import-not-at-top,wrong-import-position

MODELS = ("cnn", "st_fcn_aff")


def _args(tmp_path, *extra):
  return ["--variants", "R", "--models", ",".join(MODELS), "--seeds", "2", "--preset", "test",
          "--protocol_name", "smoke", "--output_dir", str(tmp_path / "results"), *extra]


def test_reproduce_records_skip_resume_and_table(tmp_path):
  steps = reproduce.load_config_module().get_config("preset=test").train.num_steps
  written = reproduce.main(_args(tmp_path))
  results = tmp_path / "results" / "smoke"
  expected = sorted(str(results / f"R_{m}_seed{s}.json") for m in MODELS for s in (0, 1))
  assert sorted(written) == expected

  records = {}
  for path in expected:
    with open(path) as f:
      r = json.load(f)
    records[(r["model"], r["seed"])] = r
    assert r["variant"] == "R" and r["preset"] == "test" and r["protocol"] == "smoke"
    assert r["iterations"] == steps
    assert 0.0 <= r["test_error"] <= 100.0 and 0.0 <= r["validation_error"] <= 100.0
    assert r["test_nseen"] == 300 and r["data_source"] == "synthetic"
    assert r["best_validation"]["step"] in (10, 20)
    assert r["num_params"] > 0 and r["wall_time_s"] > 0 and r["num_seeds_in_program"] == 2
    assert r["device"] and r["jax_version"] and r["git_commit"]
    assert f"--models {r['model']}" in r["command"] and "--protocol_name smoke" in r["command"]
    paper = reproduce.load_config_module().PAPER_ERRORS["R"][r["model"]]
    assert r["paper_error"] == paper
  assert {s for _, s in records} == {0, 1}

  # The records are the per-seed numbers of the workdir's last evaluation.
  workdir = tmp_path / "workdirs" / "reproduce" / "smoke" / "R_cnn"
  with open(workdir / "metrics.jsonl") as f:
    last = [m for m in map(json.loads, f) if "test/error_per_seed" in m][-1]
  assert last["step"] == steps
  assert [records[("cnn", s)]["test_error"] for s in (0, 1)] == last["test/error_per_seed"]
  for s in (0, 1):
    r = records[("cnn", s)]
    assert r["test_ncorrect"] == last["test/ncorrect"][s]
    assert r["test_error"] == pytest.approx(100 * (1 - r["test_ncorrect"] / r["test_nseen"]))
  # The two seeds are two models (own initialisation and data): their losses differ.
  assert last["test/loss_per_seed"][0] != last["test/loss_per_seed"][1]

  # Re-running skips the finished cells: nothing is rewritten or retrained.
  mtimes = {p: os.stat(p).st_mtime_ns for p in expected + [str(workdir / "metrics.jsonl")]}
  assert reproduce.main(_args(tmp_path)) == []
  assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes

  # A missing record is rebuilt from the finished workdir (resume: no steps left to train).
  os.remove(expected[1])
  assert reproduce.main(_args(tmp_path, "--models", "cnn")) == [expected[1]]
  with open(expected[1]) as f:
    assert json.load(f)["test_error"] == records[("cnn", 1)]["test_error"]
  assert os.stat(workdir / "metrics.jsonl").st_mtime_ns == mtimes[str(workdir / "metrics.jsonl")]

  # A workdir trained under another config is refused, not silently mixed.
  os.remove(expected[1])
  with pytest.raises(SystemExit, match="1 of 1 cells failed"):
    reproduce.main(_args(tmp_path, "--models", "cnn", "--num_steps", "30"))

  out, png = tmp_path / "results.md", tmp_path / "results.png"
  text = make_table.main(["--results_dir", str(tmp_path / "results"), "--out", str(out),
                          "--plot", str(png)])
  assert out.read_text().strip() == text.strip() and png.stat().st_size > 0
  assert "![paper vs measured](results.png)" in text
  # Without --plot no chart is written or linked (the committed one stays as it is).
  chart = os.path.join(REPO, "docs", "images", "results.png")
  before = os.stat(chart).st_mtime_ns
  assert "![" not in make_table.main(["--results_dir", str(tmp_path / "results")])
  assert os.stat(chart).st_mtime_ns == before
  row = next(l for l in text.splitlines() if l.startswith("| `st_fcn_aff` |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  errors = [records[("st_fcn_aff", s)]["test_error"] for s in (0, 1)]
  assert cells[1] == "1.2"  # R paper.
  assert cells[2] == f"{np.mean(errors):.2f} +- {np.std(errors, ddof=1):.2f} (2 seeds)"
  assert cells[3] == "0.8" and cells[4] == "not run"  # RTS.
  cnn_row = next(l for l in text.splitlines() if l.startswith("| `cnn` |"))
  assert "| 1.2 |" in cnn_row and "(1 seed)" in cnn_row  # Seed 1's record was removed above.
  assert "## Protocol `smoke`" in text and "synthetic" in text and "2 of 32 cells run" in text
  assert "Not run under `smoke` (0 of 4 cells)" in text  # TC.
  assert "commit" not in text

  # --readme rewrites only the generated block of a README, with the same cells.
  readme = tmp_path / "README.md"
  readme.write_text(f"# Title\n\n{make_table.README_BEGIN}\nold\n{make_table.README_END}\n"
                    "\n## After\n")
  make_table.main(["--results_dir", str(tmp_path / "results"), "--readme", str(readme)])
  new = readme.read_text()
  assert new.startswith("# Title\n") and new.endswith(f"{make_table.README_END}\n\n## After\n")
  assert "old" not in new and row in new and "Protocol `smoke`" in new
  assert "commit" not in new  # Commits live in the records, not in the tables.


def test_eval_every_must_be_positive(capsys):
  with pytest.raises(SystemExit):
    reproduce.parse_args(["--variants", "R", "--eval_every", "0"])
  assert "--eval_every must be >= 1, got 0" in capsys.readouterr().err


def test_reduced_protocol_scales_the_step_decay():
  args = reproduce.parse_args(["--variants", "RTS", "--models", "cnn", "--num_steps", "3000",
                               "--protocol_name", "reduced-cpu"])
  config = reproduce.build_config(reproduce.load_config_module(), args, "RTS", "cnn")
  assert config.train.num_steps == 3000 and config.train.decay_every == 1000
  assert config.train.lr == 0.01 and config.train.batch_size == 256
  assert config.train.optimizer == "sgd" and config.num_seeds == 3
  assert config.eval_every == config.checkpoint_every == 300
  paper = reproduce.build_config(reproduce.load_config_module(),
                                 reproduce.parse_args(["--variants", "RTS"]), "RTS", "cnn")
  assert paper.train.num_steps == 150_000 and paper.train.decay_every == 50_000
  assert paper.eval_every == 5_000
  assert args.workdir_root.endswith(os.path.join("workdirs", "reproduce"))
  assert reproduce.cell_command(args, "RTS", "cnn") == (
      "python scripts/reproduce.py --variants RTS --models cnn --preset paper --seeds 3 "
      "--num_steps 3000 --protocol_name reduced-cpu")


def test_one_program_per_seed(tmp_path):
  written = reproduce.main(["--variants", "R", "--models", "fcn", "--seeds", "2", "--preset",
                            "test", "--protocol_name", "smoke", "--one_program_per_seed",
                            "--output_dir", str(tmp_path / "results")])
  assert sorted(os.path.basename(p) for p in written) == ["R_fcn_seed0.json", "R_fcn_seed1.json"]
  workdirs = tmp_path / "workdirs" / "reproduce" / "smoke"
  assert sorted(os.listdir(workdirs)) == ["R_fcn", "R_fcn_from_seed1"]
  for path in written:
    with open(path) as f:
      r = json.load(f)
    assert r["num_seeds_in_program"] == 1 and r["seed_index"] == 0
    assert f"--seeds 1 --first_seed {r['seed']}" in r["command"] or (
        r["seed"] == 0 and "--seeds 1 --protocol_name" in r["command"])
