"""scripts/bench/loop_anatomy: parsing a disassembly, finding the loop, counting by kind."""

import json
import shutil
import subprocess
import sys

import pytest

from scripts.bench import loop_anatomy
from scripts.bench import timing

# A loop of 16 points per iteration: two gathered elements, two index moves,
# one lane insert from a register, one hardware gather, arithmetic and the counter.
DISASSEMBLY = """
0000000000000000 <fusion>:
   0:	push   %rbp
  10:	vmovd  %xmm4,%edi
  14:	vpextrd $0x2,%xmm4,%r8d
  1a:	vmovss (%rdx,%rdi,4),%xmm16
  20:	vinsertps $0x10,(%rdx,%r8,4),%xmm16,%xmm16
  28:	vinsertf32x4 $0x1,%xmm5,%ymm16,%ymm16
  30:	vgatherdps (%rdx,%zmm1,4),%zmm2{%k1}
  38:	vmulps %zmm3,%zmm5,%zmm3
  3e:	vmovups %zmm4,(%rcx,%rsi,4)
  45:	add    $0x10,%rsi
  49:	cmp    $0x18800,%rsi
  50:	jne    10 <fusion+0x10>
  56:	jmp    60 <fusion+0x60>
  60:	ret
"""


def test_parse_and_find_the_loop():
  instructions = loop_anatomy.parse(DISASSEMBLY)
  assert len(instructions) == 14
  loop = loop_anatomy.innermost_loop(instructions)
  assert (loop[0].address, loop[-1].mnemonic) == (0x10, "jne")
  assert loop_anatomy.points_per_iteration(loop) == 16


def test_operands_split_outside_parentheses():
  ins = loop_anatomy.parse("  20:	vinsertps $0x10,(%rdx,%r8,4),%xmm16,%xmm16")[0]
  assert ins.operand_list == ["$0x10", "(%rdx,%r8,4)", "%xmm16", "%xmm16"]
  assert ins.reads_memory
  store = loop_anatomy.parse("  3e:	vmovups %zmm4,(%rcx,%rsi,4)")[0]
  assert not store.reads_memory  # Memory as the destination is a store.


def test_count_by_kind():
  loop = loop_anatomy.innermost_loop(loop_anatomy.parse(DISASSEMBLY))
  counts = loop_anatomy.count(loop)
  assert counts["instructions"] == 11
  assert counts["by_kind"] == {"element loads": 2, "hardware gathers": 1, "index moves": 2,
                               "lane inserts": 1, "other": 5}
  assert counts["by_kind_per_point"]["element loads"] == pytest.approx(2 / 16)


def test_no_counter_gives_no_points():
  loop = loop_anatomy.parse("  0:	vaddps %zmm1,%zmm2,%zmm3\n  6:	jne    0 <f>")
  assert loop_anatomy.points_per_iteration(loop) is None
  assert loop_anatomy.count(loop)["by_kind_per_point"] is None


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_the_sampler_loop_reads_four_pixels_per_point(tmp_path):
  out = tmp_path / "loop.json"
  subprocess.run([sys.executable, "-m", "scripts.bench.loop_anatomy", "--out", str(out)],
                 cwd=timing.ROOT, check=True, capture_output=True)
  saved = json.loads(out.read_text())
  loop = saved["loop"]
  assert "--xla_dump_to" not in (saved["provenance"]["xla_flags"] or "")
  assert loop["points_per_iteration"] in (4, 8, 16)
  # Bilinear row pairs read four pixels per point: one scalar load each (the
  # CPUs measured), or vector gathers where LLVM emits them for the CPU.
  if loop["by_kind"].get("hardware gathers"):
    assert loop["by_kind"]["hardware gathers"] >= 4 * loop["points_per_iteration"] // 16
  else:
    assert loop["by_kind_per_point"]["element loads"] == pytest.approx(4.0)
