"""The distorted-MNIST variants of the STN paper: one frozen registry of every parameter.

Jaderberg et al., *Spatial Transformer Networks*, NIPS 2015, Appendix A.4.
Each `VARIANTS` entry cites its source and lists its UNVERIFIED assumptions
in `unverified`; `stnjax.data.distortions` draws and renders them.

Placement without clipping (RTS, addition, T, TC):

* RTS/addition (`placement="ink_box"`): the digit is rotated and scaled about
  the centre of its *ink bounding box* (the box of its non-zero pixels,
  widened by half a pixel on each side: the support of its bilinear
  interpolation). The rotated, scaled box's axis-aligned extent is computed
  for the drawn angle and scale, and the box centre is drawn uniformly in the
  range that keeps that extent inside the canvas. (The whole 28x28 box cannot
  be used: rotated by 45 degrees and scaled by 1.2 its extent is 47.5 px,
  more than the 42 px canvas.) No ink is ever clipped.
* T/TC (`placement="digit_box"`): the whole 28x28 digit box is pasted at an
  integer offset uniform in [0, S - 28] on both axes (nearest sampling: an
  exact copy), as in the usual cluttered-MNIST generators.
"""

import dataclasses
import types
from collections.abc import Mapping


MNIST_SIZE = 28
KINDS = ("plain", "rotate", "rts", "projective", "tps", "translate", "clutter", "addition")
_PAPER = "Jaderberg et al., Spatial Transformer Networks, NIPS 2015"


@dataclasses.dataclass(frozen=True)
class QuadRule:
  """When a P draw's corner offsets are redrawn (`quad_is_well_formed`).

  Taken literally (corners moved by N(0, 5 px)), a few percent of P draws
  fold the quad over or squeeze the digit into a dot or a streak; the
  paper's 0.8% error rules such draws out, so they are redrawn. With these
  bounds no image of the fixed sets keeps less than 15% of its digit's ink
  (tests/test_data_eval_sets.py).

  Attributes:
    min_angle_deg: every interior angle in `[min_angle_deg, 180 - min_angle_deg]`.
    min_area_fraction: quad area at least this fraction of the scaled box's.
    max_perspective: bound on `max w / min w` of the homography at the corners.
    max_draws: candidates drawn per example (the first well-formed one is used).
  """
  min_angle_deg: float = 25.0
  min_area_fraction: float = 0.5
  max_perspective: float = 4.0
  max_draws: int = 16


@dataclasses.dataclass(frozen=True)
class Variant:
  """One distorted-MNIST variant: every parameter of its distortion.

  Attributes:
    name: registry key (lower case), also the TFDS config name.
    paper_name: the paper's name (R, RTS, P, E, TC) or a control's.
    kind: one of `KINDS`: which distortion function applies it.
    image_size: output side S (images are S x S).
    channels: output channels C (2 for addition: one digit per channel).
    num_classes: 10, or 19 for addition (sums 0..18).
    angle_range_deg: rotation uniform in this range (degrees), or None.
    scale_range: digit size factor uniform in this range (1 = 28 px box), or None.
    corner_std_px: std of each corner's displacement in x and y (pixels, P).
    quad_rule: when P redraws the corner offsets (`QuadRule`); None takes every draw.
    tps_lattice: k of the k x k TPS control lattice (E).
    tps_std_px: std of each control point's displacement in x and y (pixels, E).
    placement: "ink_box" or "digit_box" (module docstring), or None (centred).
    num_clutter: clutter patches per image (TC).
    clutter_size: side of each square clutter patch in pixels (TC).
    clutter_crop_range: (lo, hi) of the top-left corner of the crop cut from
      the clutter digit, in pixels, both axes, inclusive (TC).
    description: one line.
    source: where each parameter comes from.
    unverified: the attributes that are assumptions (UNVERIFIED), not
      taken from the paper.
  """
  name: str
  paper_name: str
  kind: str
  image_size: int
  channels: int = 1
  num_classes: int = 10
  angle_range_deg: tuple[float, float] | None = None
  scale_range: tuple[float, float] | None = None
  corner_std_px: float | None = None
  quad_rule: QuadRule | None = None
  tps_lattice: int | None = None
  tps_std_px: float | None = None
  placement: str | None = None
  num_clutter: int = 0
  clutter_size: int = 0
  clutter_crop_range: tuple[int, int] | None = None
  description: str = ""
  source: str = ""
  unverified: tuple[str, ...] = ()

  @property
  def shape(self) -> tuple[int, int, int]:
    """`(S, S, C)` of one output image."""
    return (self.image_size, self.image_size, self.channels)


def _registry(*variants: Variant) -> Mapping[str, Variant]:
  for v in variants:
    assert v.kind in KINDS, v
    assert all(hasattr(v, f) for f in v.unverified), v
  return types.MappingProxyType({v.name: v for v in variants})


VARIANTS: Mapping[str, Variant] = _registry(
    Variant(
        name="none", paper_name="MNIST", kind="plain", image_size=28,
        description="Plain MNIST, no distortion (control).",
        source="Control, not a paper variant."),
    Variant(
        name="r", paper_name="R", kind="rotate", image_size=28, angle_range_deg=(-90.0, 90.0),
        description="Rotation uniform in [-90, 90] degrees about the image centre, 28x28.",
        source=f"{_PAPER}, Appendix A.4: rotation U[-90, 90] deg (verbatim). "
               "Image size 28x28 is the natural reading, not stated.",
        unverified=("image_size",)),
    Variant(
        name="rts", paper_name="RTS", kind="rts", image_size=42, angle_range_deg=(-45.0, 45.0),
        scale_range=(0.7, 1.2), placement="ink_box",
        description="Rotation U[-45, 45] deg, scale U[0.7, 1.2], placed uniformly in 42x42.",
        source=f"{_PAPER}, Appendix A.4 (agreed by 4+ reproductions): rotation U[-45, 45] deg, "
               "scale U[0.7, 1.2], random location in a 42x42 image. The placement rule that "
               "keeps the digit inside is ours.",
        unverified=("placement",)),
    Variant(
        name="p", paper_name="P", kind="projective", image_size=28, scale_range=(0.75, 1.0),
        corner_std_px=5.0, quad_rule=QuadRule(),
        description="Scale U[0.75, 1], then each of the 4 corners moved by N(0, 5 px) (redrawn "
                    "while the quad folds or squeezes the digit); 28x28.",
        source=f"{_PAPER}, Appendix A.4 (as rebuilt from 1 code source): scale U[0.75, 1], "
               "corners moved by N(0, 5 px), projective warp. Image size not stated. The "
               "redraw rule (QuadRule) is ours.",
        unverified=("image_size", "quad_rule")),
    Variant(
        name="e", paper_name="E", kind="tps", image_size=28, scale_range=(0.75, 1.0),
        tps_lattice=4, tps_std_px=1.5,
        description="Scale U[0.75, 1], then 16 TPS control points (4x4 lattice) moved by "
                    "N(0, 1.5 px); 28x28.",
        source=f"{_PAPER}, Appendix A.4: 16 control points on a 4x4 regular grid moved by "
               "N(0, 1.5 px), thin-plate-spline warp. The prior scale U[0.75, 1] (as for P) is "
               "an assumption; set scale_range=(1.0, 1.0) to drop it.",
        unverified=("scale_range", "image_size")),
    Variant(
        name="t", paper_name="T", kind="translate", image_size=60, placement="digit_box",
        description="Digit at a uniformly random integer position in 60x60, no clutter (control).",
        source="Control, not a paper variant: TC without the clutter.",
        unverified=("placement",)),
    Variant(
        name="tc", paper_name="TC", kind="clutter", image_size=60, placement="digit_box",
        num_clutter=6, clutter_size=6, clutter_crop_range=(4, 18),
        description="Digit at a random position in 60x60 plus six 6x6 patches cut from other "
                    "digits, at random positions (pixel-wise max).",
        source=f"{_PAPER}, Section 4.1 / Appendix A.4: 60x60, digit at a random location, "
               "six random 6x6 patches cut from other MNIST training digits. Ours: the crop "
               "lies inside the central 20x20 digit box (top-left in [4, 18], so patches "
               "rarely come out blank), patches lie fully inside the canvas, they combine with "
               "the digit by a pixel-wise max, and they come from the same pool as the digit "
               "(train pool for training, validation/test digits for those sets).",
        unverified=("placement", "clutter_crop_range")),
    Variant(
        name="addition", paper_name="MNIST addition", kind="addition", image_size=42, channels=2,
        num_classes=19, angle_range_deg=(-45.0, 45.0), scale_range=(0.7, 1.2),
        placement="ink_box",
        description="Two digits, each RTS-distorted independently in its own 42x42 channel; "
                    "label = their sum (19 classes).",
        source=f"{_PAPER}, Section 4.1 / Appendix A.4: two 42x42 channels, each digit RTS "
               "distorted independently, 19 classes. The second digit is drawn uniformly "
               "from the same pool (ours).",
        unverified=("placement",)),
)


def get_variant(variant: "str | Variant") -> Variant:
  """The `Variant` named `variant` (case-insensitive), or `variant` itself.

  Raises:
    ValueError: unknown name (the message lists the valid ones).
  """
  if isinstance(variant, Variant):
    return variant
  if isinstance(variant, str) and variant.lower() in VARIANTS:
    return VARIANTS[variant.lower()]
  raise ValueError(f"`variant` must be one of {tuple(VARIANTS)} (case-insensitive), got "
                   f"{variant!r}.")
