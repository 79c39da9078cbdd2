"""scripts/calibration.py: the validation-curve table."""

import pytest

from scripts import calibration


def _run(model, errors):
  return {"model": model, "data": "addition", "padding": "VALID_MIN2", "num_steps": 3000,
          "validation_error": {str(s): e for s, e in errors.items()}}


def test_markdown_has_a_column_per_evaluated_step_and_blanks_for_missing_ones():
  runs = [_run("fcn", {0: 90.0, 1000: 80.0, 1500: 75.0, 3000: 60.0}),
          _run("cnn", {0: 90.0, 1000: 50.25, 3000: 40.0})]
  lines = calibration.markdown(runs).splitlines()
  assert lines[0] == "| model | data | padding | steps | 1k | 1.5k | 3k |"  # Step 0 left out.
  assert lines[2] == "| `fcn` | addition | VALID_MIN2 | 3,000 | 80.00 | 75.00 | 60.00 |"
  assert lines[3] == "| `cnn` | addition | VALID_MIN2 | 3,000 | 50.25 |  | 40.00 |"


def test_markdown_every_keeps_only_multiples():
  runs = [_run("fcn", {0: 90.0, 1000: 80.0, 2000: 70.0, 3000: 60.0})]
  lines = calibration.markdown(runs, every=2000).splitlines()
  assert lines[0] == "| model | data | padding | steps | 2k |"
  assert lines[2].endswith("| 70.00 |")
  with pytest.raises(ValueError, match="every must be a positive number of steps, got 0"):
    calibration.markdown(runs, every=0)
