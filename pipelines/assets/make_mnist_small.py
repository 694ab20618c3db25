"""Build `mnist_small.npz`, the class-balanced MNIST subset that tokgen ships as its default data.

Run once, from the repository root: `python pipelines/assets/make_mnist_small.py
/work/shared/data/mnist.npz`. It takes 1,000 training images per class from the official MNIST
training split and 200 test images per class from the official test split, chosen uniformly at
random with a fixed seed, and keeps them in their original MNIST order. Pixels and labels are
copied unchanged; `index_train`/`index_test` record each image's position in the original split,
so that the subset can be traced back to (and rebuilt from) the full data set. The output is
deterministic: the same input file always gives the same arrays.

MNIST: Y. LeCun, C. Cortes and C. J. C. Burges, "The MNIST database of handwritten digits".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
SEED = 20240601


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` random positions of every label value, returned sorted (original order)."""
    chosen = [rng.choice(np.flatnonzero(labels == value), size=per_class, replace=False) for value in range(10)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mnist", type=Path, help="full MNIST npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("mnist_small.npz"))
    args = parser.parse_args()
    source = np.load(args.mnist, allow_pickle=False)
    rng = np.random.default_rng(SEED)
    index_train = balanced_indices(source["y_train"], TRAIN_PER_CLASS, rng)
    index_test = balanced_indices(source["y_test"], TEST_PER_CLASS, rng)
    np.savez_compressed(
        args.out,
        x_train=source["x_train"][index_train],
        y_train=source["y_train"][index_train],
        x_test=source["x_test"][index_test],
        y_test=source["y_test"][index_test],
        index_train=index_train.astype(np.int32),
        index_test=index_test.astype(np.int32),
    )


if __name__ == "__main__":
    main()
