"""stnjax.data: MNIST through tensorflow-datasets (no TensorFlow) and its distorted variants.

Import it explicitly (`from stnjax import data`); `import stnjax` stays light.

* `load_mnist(data_dir=None, *, mnist_dir=None)`: MNIST as numpy arrays
  (train = first 50k training digits, validation = last 10k, test), via the
  TFDS dataset `stnjax_mnist` (module `stnjax.data.mnist`).
* `VARIANTS`, `sample_train_batch(variant, key, pool_images, pool_labels,
  batch_size)`: the paper's distortions (R, RTS, P, E, TC, addition, and the
  controls none and T), drawn on device (module `stnjax.data.distortions`).
* `load_eval_set(variant, split, data_dir=None)`: the fixed, versioned
  validation and test sets, via the TFDS dataset `distorted_mnist/<variant>`
  (module `stnjax.data.distorted_mnist`).
"""

from stnjax.data.distorted_mnist import EVAL_SHA256
from stnjax.data.distorted_mnist import EVAL_SPLITS
from stnjax.data.distorted_mnist import DistortedMnist
from stnjax.data.distorted_mnist import EvalSetMismatchError
from stnjax.data.distorted_mnist import eval_set_sha256
from stnjax.data.distorted_mnist import generate_eval_set
from stnjax.data.distorted_mnist import load_eval_set
from stnjax.data.distortions import distort
from stnjax.data.distortions import render
from stnjax.data.distortions import sample_train_batch
from stnjax.data.mnist import CorruptCacheError
from stnjax.data.mnist import MNIST_DIR_ENV
from stnjax.data.mnist import MNIST_URL
from stnjax.data.mnist import MnistFileError
from stnjax.data.mnist import Split
from stnjax.data.mnist import StnjaxMnist
from stnjax.data.mnist import load_mnist
from stnjax.data.mnist import read_idx_file
from stnjax.data.mnist import read_mnist_dir
from stnjax.data.variants import VARIANTS
from stnjax.data.variants import Variant
from stnjax.data.variants import get_variant

__all__ = (
    "CorruptCacheError",
    "DistortedMnist",
    "EVAL_SHA256",
    "EVAL_SPLITS",
    "EvalSetMismatchError",
    "MNIST_DIR_ENV",
    "MNIST_URL",
    "MnistFileError",
    "Split",
    "StnjaxMnist",
    "VARIANTS",
    "Variant",
    "distort",
    "eval_set_sha256",
    "generate_eval_set",
    "get_variant",
    "load_eval_set",
    "load_mnist",
    "read_idx_file",
    "read_mnist_dir",
    "render",
    "sample_train_batch",
)
