"""stnjax.data: MNIST through tensorflow-datasets (no TensorFlow) and its distorted variants.

Import it explicitly (`from stnjax import data`); `import stnjax` stays light.
"""

from stnjax.data.mnist import MNIST_DIR_ENV
from stnjax.data.mnist import MNIST_URL
from stnjax.data.mnist import MnistFileError
from stnjax.data.mnist import Split
from stnjax.data.mnist import StnjaxMnist
from stnjax.data.mnist import load_mnist
from stnjax.data.mnist import read_idx_file
from stnjax.data.mnist import read_mnist_dir

__all__ = (
    "MNIST_DIR_ENV",
    "MNIST_URL",
    "MnistFileError",
    "Split",
    "StnjaxMnist",
    "load_mnist",
    "read_idx_file",
    "read_mnist_dir",
)
