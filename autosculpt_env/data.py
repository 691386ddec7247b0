"""Datasets and their fixed train / reward / test splits.

Every dataset is split three ways (DESIGN.md §4):

* ``train``: the official training set minus the ``reward`` hold-out. Zoo models and
  fine-tuning see only this split.
* ``reward``: a fixed, seeded hold-out of the official training set. Environment rewards
  are computed on it and nowhere else.
* ``test``: the official test set, touched only by final evaluation.

Images are returned as normalised ``float32`` tensors of shape ``(N, C, H, W)`` and labels
as ``int64``. Nothing is downloaded: each loader reads files that are already on disk and
says where it looked and how to get them when they are missing.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100")
SPLITS = ("train", "reward", "test")
SPLIT_SEED = 0
"""Seed of the permutation that carves the ``reward`` hold-out out of the training set."""

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_REWARD_SIZE = 5000
DIGITS_TEST_FRACTION = 0.2


class DatasetError(FileNotFoundError):
    """A dataset is missing, truncated or malformed. The message says how to fix it."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: what a model needs to be built for it."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


INFO = {
    "digits": DatasetInfo("digits", 1, 8, 10, (0.3,), (0.38,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(
        "cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": DatasetInfo(
        "cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
}


class ImageDataset(Dataset):
    """In-memory image classification split.

    Attributes:
        images: ``float32`` tensor ``(N, C, H, W)``, normalised per channel.
        labels: ``int64`` tensor ``(N,)``.
        info: the dataset's :class:`DatasetInfo`.
        split: ``"train"``, ``"reward"`` or ``"test"``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, split: str):
        self.images = images
        self.labels = labels
        self.info = info
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def __repr__(self) -> str:
        return f"ImageDataset({self.info.name!r}, split={self.split!r}, n={len(self)})"


def info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of a dataset name, or raise a ``ValueError``."""
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return INFO[name]


def reward_size(name: str, n_train: int) -> int:
    """Size of the ``reward`` hold-out: 5,000 for Fashion-MNIST, the same 1/12 elsewhere."""
    if name == "fashion-mnist":
        return FASHION_MNIST_REWARD_SIZE
    return max(1, round(n_train * FASHION_MNIST_REWARD_SIZE / 60000))


def split_indices(name: str, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(train_idx, reward_idx)``: disjoint, seeded, covering ``range(n_train)``."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_train)
    k = reward_size(name, n_train)
    return np.sort(perm[k:]), np.sort(perm[:k])


def load(name: str, split: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load one split of a dataset.

    Args:
        name: ``"digits"``, ``"fashion-mnist"``, ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"``, ``"reward"`` or ``"test"``.
        data_dir: folder holding the files. Defaults to ``$AUTOSCULPT_DATA_DIR``, then to
            the standard location (Debian's ``dataset-fashion-mnist`` for Fashion-MNIST).

    Raises:
        ValueError: unknown name or split.
        DatasetError: files missing, truncated or inconsistent; the message names the path
            tried and the fix.
    """
    ds_info = info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    pool = "test" if split == "test" else "train"
    x, y = _cached_raw(name, pool, data_dir)
    if split != "test":
        train_idx, reward_idx = split_indices(name, len(y))
        idx = reward_idx if split == "reward" else train_idx
        x, y = x[idx], y[idx]
    images = torch.from_numpy(x).float()
    mean = torch.tensor(ds_info.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds_info.std).view(1, -1, 1, 1)
    images = (images - mean) / std
    return ImageDataset(images.contiguous(), torch.from_numpy(y).long(), ds_info, split)


def split_size(name: str, split: str, data_dir: str | os.PathLike | None = None) -> int:
    """Number of images in one split of a dataset (reads the files as :func:`load` does,
    without building the normalised tensors)."""
    info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    _, y = _cached_raw(name, "test" if split == "test" else "train", data_dir)
    if split == "test":
        return len(y)
    train_idx, reward_idx = split_indices(name, len(y))
    return len(reward_idx if split == "reward" else train_idx)


def check_samples(
    setting: str, samples: int, name: str, split: str, data_dir: str | os.PathLike | None = None
) -> int:
    """Return ``samples`` when the split holds that many images.

    A setting that asks for more images than a split holds is refused rather than cut to
    the split's size: a record or row would otherwise state a number that was not used.

    Raises:
        ValueError: naming the setting, its value, the split's size and the fix.
    """
    size = split_size(name, split, data_dir)
    if samples > size:
        raise ValueError(
            f"{setting}={samples} is more than the {split} split of {name} holds ({size} "
            f"images); pass {setting} <= {size}"
        )
    return samples


_RAW_CACHE: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}


def _cached_raw(name: str, pool: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    root = str(_resolve_dir(name, data_dir)) if name != "digits" else ""
    key = (name, pool, root)
    if key not in _RAW_CACHE:
        readers = {
            "digits": _read_digits,
            "fashion-mnist": _read_fashion_mnist,
            "cifar10": _read_cifar,
            "cifar100": _read_cifar,
        }
        _RAW_CACHE[key] = readers[name](name, pool, Path(root))
    return _RAW_CACHE[key]


def _resolve_dir(name: str, data_dir) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("AUTOSCULPT_DATA_DIR")
    if env:
        return Path(env) / name if (Path(env) / name).is_dir() else Path(env)
    if name == "fashion-mnist":
        return FASHION_MNIST_DEBIAN_DIR
    return Path.home() / "data" / name


# --------------------------------------------------------------------------- digits
def _read_digits(name: str, pool: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test = round(len(y) * DIGITS_TEST_FRACTION)
    idx = np.sort(perm[:n_test] if pool == "test" else perm[n_test:])
    return x[idx], y[idx]


# ---------------------------------------------------------------------- fashion-mnist
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_FMNIST_FIX = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (files land in "
    f"{FASHION_MNIST_DEBIAN_DIR}), or pass data_dir= / set AUTOSCULPT_DATA_DIR to a folder "
    "holding the four standard files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
)


def _read_idx(path: Path, expected_ndim: int, expected_len: int) -> np.ndarray:
    """Read a (possibly gzipped) IDX file and check its header against what is expected."""
    if not path.exists():
        plain = path.with_suffix("")
        if plain.exists():
            path = plain
        else:
            raise DatasetError(f"Fashion-MNIST file not found: {path}. {_FMNIST_FIX}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # truncated gzip stream, unreadable file
        raise DatasetError(
            f"cannot read {path} ({e}); the file looks truncated. {_FMNIST_FIX}"
        ) from e
    if len(raw) < 4 + 4 * expected_ndim:
        raise DatasetError(f"{path} is too short to be an IDX file. {_FMNIST_FIX}")
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08 or ndim != expected_ndim:
        raise DatasetError(
            f"{path} is not an unsigned-byte IDX file with {expected_ndim} dimensions "
            f"(header {raw[:4].hex()}). {_FMNIST_FIX}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if shape[0] != expected_len or body.size != int(np.prod(shape)):
        raise DatasetError(
            f"{path} holds {body.size} bytes for a header of shape {shape}; expected "
            f"{expected_len} items. The file is truncated or not the standard one. {_FMNIST_FIX}"
        )
    return body.reshape(shape)


def _read_fashion_mnist(name: str, pool: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    img_file, lbl_file, n = _FMNIST_FILES[pool]
    if not root.is_dir():
        raise DatasetError(f"Fashion-MNIST folder not found: {root}. {_FMNIST_FIX}")
    x = _read_idx(root / img_file, 3, n)
    y = _read_idx(root / lbl_file, 1, n).astype(np.int64)
    if x.shape[1:] != (28, 28):
        raise DatasetError(f"{root / img_file} holds {x.shape[1:]} images, expected 28x28.")
    if y.min() < 0 or y.max() > 9:
        raise DatasetError(
            f"{root / lbl_file} has labels outside 0..9 (min {y.min()}, max {y.max()}); "
            f"the labels file is mislabelled or belongs to another dataset. {_FMNIST_FIX}"
        )
    return (x.astype(np.float32) / 255.0)[:, None], y


# ----------------------------------------------------------------------------- cifar
def _cifar_fix(name: str) -> str:
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    return (
        f"Pass data_dir= (or set AUTOSCULPT_DATA_DIR) to the extracted standard '{folder}' "
        "folder of the Python version of the dataset. Nothing is downloaded automatically."
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only plain containers and NumPy arrays.

    The CIFAR Python folders are pickles written by someone else; this refuses every
    global except the few NumPy needs, so a crafted file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DatasetError(f"refusing to load {module}.{name} from a CIFAR pickle")


def _unpickle(path: Path, name: str) -> dict:
    if not path.exists():
        raise DatasetError(f"{name} file not found: {path}. {_cifar_fix(name)}")
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f, encoding="bytes").load()
        except (EOFError, pickle.UnpicklingError) as e:
            raise DatasetError(f"cannot read {path} ({e}); truncated? {_cifar_fix(name)}") from e


def _read_cifar(name: str, pool: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if pool == "train" else ["test_batch"]
        label_key, n_classes, n = b"labels", 10, 50000 if pool == "train" else 10000
    else:
        files = ["train" if pool == "train" else "test"]
        label_key, n_classes, n = b"fine_labels", 100, 50000 if pool == "train" else 10000
    if not root.is_dir():
        raise DatasetError(f"{name} folder not found: {root}. {_cifar_fix(name)}")
    xs, ys = [], []
    for fname in files:
        d = _unpickle(root / fname, name)
        if b"data" not in d or label_key not in d:
            raise DatasetError(f"{root / fname} lacks the keys data/{label_key.decode()}.")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(y) != n or len(x) != n:
        raise DatasetError(f"{root} holds {len(y)} {pool} images, expected {n}. Truncated?")
    if y.min() < 0 or y.max() >= n_classes:
        raise DatasetError(f"{root} has labels outside 0..{n_classes - 1}: mislabelled.")
    return x.astype(np.float32) / 255.0, y
