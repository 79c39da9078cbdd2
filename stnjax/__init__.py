"""stnjax: Spatial Transformer Networks (Jaderberg et al., NIPS 2015) in JAX.

The core is a set of pure functions: grid generators (`affine_grid`,
`projective_grid`, `tps_grid`) that map output pixels to normalised source
coordinates `(x, y[, z])`, and `grid_sample`, which samples channels-last
images at those coordinates with PyTorch-exact semantics. Each works on one
example and on any leading batch dimensions, and is differentiable to any
order with `jax.grad`. `stnjax.xla_cpu.configure()`, called before JAX
starts, sets the XLA:CPU flags the training scripts use.
"""

from stnjax.grids import affine_grid
from stnjax.grids import base_grid
from stnjax.grids import projective_grid
from stnjax.grids import tps_control_points
from stnjax.grids import tps_grid
from stnjax.grids import tps_kernel
from stnjax.sampling import grid_sample
from stnjax.transforms import affine_to_homography
from stnjax.transforms import attention_theta
from stnjax.transforms import homography_from_points
from stnjax.transforms import identity_theta
from stnjax.transforms import rts_theta
from stnjax import xla_cpu  # pylint: disable=g-bad-import-order

__version__ = "0.1.0"

__all__ = (
    "affine_grid",
    "affine_to_homography",
    "attention_theta",
    "base_grid",
    "grid_sample",
    "homography_from_points",
    "identity_theta",
    "projective_grid",
    "rts_theta",
    "tps_control_points",
    "tps_grid",
    "tps_kernel",
)
