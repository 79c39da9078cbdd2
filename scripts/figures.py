"""Writes the figures of a workdir: `python scripts/figures.py --workdir workdirs/main`.

Learning curves, input vs transformer output grid, and an animated GIF of the
transformer outputs across training, into `<workdir>/figures/` (see
`stnjax.figures`).
"""

from absl import app
from absl import flags

from stnjax import figures

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by stnjax.train.")
_OUT = flags.DEFINE_string("out_dir", None, "Default: <workdir>/figures.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  for path in figures.write_all(_WORKDIR.value, _OUT.value):
    print(path)


if __name__ == "__main__":
  app.run(main)
