"""What the CPU runs for `grid_sample`'s jnp sampling loop: its instructions, counted by kind.

Compiles `grid_sample` on a precomputed grid (batch 256, 28x28, one
channel: the row-pair loop, docs/performance.md) with the C++ kernel
switched off (`CpuOptions(sampler_kernel="off")`: the loop XLA emits
wherever the kernel does not apply) with XLA's dump
(`--xla_dump_to`, a temporary directory), disassembles the kernel with the
most instructions (`objdump -d`), and counts the instructions of its
innermost loop (the backward jump spanning the most instructions) by kind:

  element loads     a scalar load of one gathered pixel (`vmovss`, `vinsertps`,
                    `vpinsrd`, `vmovsd`, `vmovhps` from memory)
  index moves       moving one index out of a vector (`vmovd`, `vmovq`,
                    `vpextrd`, `vpextrq`, `vextract*`, `vpmovzx*`)
  lane inserts      building a vector from parts (`vinsertps` and
                    `vinsert*` from registers and memory)
  hardware gathers  `vgather*` / `vpgather*`
  other             everything else

with the points per iteration (the loop counter's step). The counts show
how the gather is emitted; the time per point is `bench_sampler`'s. XLA
reads its flags when the backend starts, so the script sets `XLA_FLAGS`
itself; --xla_cpu_flags on adds `stnjax.xla_cpu.configure()`'s flags
first. Needs binutils' `objdump`. With --out, writes the counts and the
provenance as JSON.

  python -m scripts.bench.loop_anatomy [--xla_cpu_flags on] [--out FILE]
"""

import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

from stnjax import xla_cpu

ELEMENT_LOADS = ("vmovss", "vinsertps", "vpinsrd", "vmovsd", "vmovhps", "vmovlps")
INDEX_MOVES = ("vmovd", "vmovq", "vpextrd", "vpextrq", "vextracti", "vextractf", "vpmovzx")
LANE_INSERTS = ("vinsertps", "vinserti", "vinsertf")
GATHERS = ("vgather", "vpgather")

_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$")
_JUMP = re.compile(r"^j[a-z]+$")


class Instruction(collections.namedtuple("Instruction", "address mnemonic operands")):
  """One disassembled instruction (objdump's AT&T syntax, no raw bytes)."""

  @property
  def operand_list(self) -> list[str]:
    """The operands, split at the commas outside parentheses (sources first, destination last)."""
    return re.findall(r"(?:[^,(]|\([^)]*\))+", self.operands.split("#")[0].strip())

  @property
  def reads_memory(self) -> bool:
    return any("(" in operand for operand in self.operand_list[:-1])


def parse(disassembly: str) -> list[Instruction]:
  """The instructions of `objdump -d --no-show-raw-insn` output, in address order."""
  out = []
  for line in disassembly.splitlines():
    match = _LINE.match(line)
    if match:
      out.append(Instruction(int(match[1], 16), match[2], match[3]))
  return out


def innermost_loop(instructions: list[Instruction]) -> list[Instruction]:
  """The instructions from the target of the longest backward jump up to the jump."""
  best = []
  for i, ins in enumerate(instructions):
    if not _JUMP.match(ins.mnemonic):
      continue
    target = ins.operands.split()[0]
    if not re.fullmatch(r"[0-9a-f]+", target) or int(target, 16) > ins.address:
      continue
    body = [x for x in instructions[:i + 1] if x.address >= int(target, 16)]
    if len(body) > len(best):
      best = body
  return best


def points_per_iteration(loop: list[Instruction]) -> int | None:
  """The step of the loop counter: the immediate added to the register compared before the jump."""
  compares = [x for x in loop if x.mnemonic == "cmp"]
  if not compares:
    return None
  register = compares[-1].operand_list[-1]
  for x in reversed(loop):
    operands = x.operand_list
    if x.mnemonic == "add" and operands[-1] == register and operands[0].startswith("$"):
      return int(operands[0][1:], 0)
  return None


def kind(ins: Instruction) -> str:
  """The kind `ins` is counted as (the module docstring's list)."""
  name = ins.mnemonic
  if name.startswith(GATHERS):
    return "hardware gathers"
  if name.startswith(ELEMENT_LOADS) and ins.reads_memory:
    return "element loads"
  if name.startswith(LANE_INSERTS):
    return "lane inserts"
  if name.startswith(INDEX_MOVES):
    return "index moves"
  return "other"


def count(loop: list[Instruction]) -> dict:
  """Instructions per kind in `loop`, and per point."""
  kinds = collections.Counter(kind(x) for x in loop)
  points = points_per_iteration(loop)
  per_point = {k: v / points for k, v in kinds.items()} if points else None
  return {"instructions": len(loop), "points_per_iteration": points,
          "by_kind": dict(sorted(kinds.items())), "by_kind_per_point": per_point,
          "mnemonics": dict(collections.Counter(x.mnemonic for x in loop).most_common())}


def largest_kernel(dump_dir: pathlib.Path, objdump: str) -> tuple[str, list[Instruction]]:
  """The name and instructions of the dumped kernel object with the most instructions."""
  best = ("", [])
  for path in sorted(dump_dir.glob("*jit_grid_sample*.o")):
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True,
                          text=True, check=True).stdout
    instructions = parse(text)
    if len(instructions) > len(best[1]):
      best = (path.name, instructions)
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--xla_cpu_flags", choices=("off", "on"), default="off",
                      help="on: stnjax.xla_cpu.configure()'s flags too (off: as imported)")
  parser.add_argument("--out", default=None, help="JSON file for the results (optional)")
  args = parser.parse_args(argv)
  objdump = shutil.which("objdump")
  if objdump is None:
    parser.error("needs binutils' objdump on PATH, found none")
  if args.xla_cpu_flags == "on":
    xla_cpu.configure()
  with tempfile.TemporaryDirectory() as dump_dir:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir}".strip()
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from scripts.bench import timing  # pylint: disable=g-import-not-at-top
    from stnjax import sampling  # pylint: disable=g-import-not-at-top

    def grid_sample(image, grid):  # Named so: XLA's dump files are named after it.
      return sampling.grid_sample_with_options(
          image, grid, cpu_options=sampling.CpuOptions(sampler_kernel="off"))

    image, grid = jnp.zeros((256, 28, 28, 1)), jnp.zeros((256, 28, 28, 2))
    jax.jit(grid_sample).lower(image, grid).compile()
    kernel, instructions = largest_kernel(pathlib.Path(dump_dir), objdump)
  if not instructions:
    raise RuntimeError(f"no kernel object of jit_grid_sample in XLA's dump ({dump_dir})")
  loop = count(innermost_loop(instructions))
  flags = " ".join(f for f in os.environ["XLA_FLAGS"].split() if not f.startswith("--xla_dump"))
  if flags:  # The provenance names the flags the loop was compiled with, not the dump.
    os.environ["XLA_FLAGS"] = flags
  else:
    del os.environ["XLA_FLAGS"]
  print(f"{timing.cpu_model()}; XLA_FLAGS {flags!r}; kernel {kernel}: "
        f"{loop['instructions']} instructions per iteration, {loop['points_per_iteration']} points")
  for name, value in loop["by_kind"].items():
    per_point = loop["by_kind_per_point"][name] if loop["by_kind_per_point"] else float("nan")
    print(f"  {name}: {value} ({per_point:.2f} per point)")
  timing.write_results(args.out, {"shape": "256x28x28x1", "workload": "sample only",
                                  "kernel": kernel, "loop": loop})
  return loop


if __name__ == "__main__":
  main()
