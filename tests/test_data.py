import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from conftest import needs_fashion_mnist

from autosculpt_env import data


def test_digits_splits_sizes_and_disjointness():
    train, reward, test = (data.load("digits", s) for s in data.SPLITS)
    assert len(test) == round(1797 * data.DIGITS_TEST_FRACTION)
    pool = 1797 - len(test)
    assert len(reward) == data.reward_size("digits", pool) == round(pool / 12)
    assert len(train) + len(reward) == pool
    tr_idx, rw_idx = data.split_indices("digits", pool)
    assert not set(tr_idx) & set(rw_idx)
    assert sorted(np.concatenate([tr_idx, rw_idx])) == list(range(pool))
    for ds in (train, reward, test):
        assert ds.images.dtype == torch.float32 and ds.images.shape[1:] == (1, 8, 8)
        assert ds.labels.dtype == torch.int64
        assert 0 <= ds.labels.min() and ds.labels.max() <= 9
    # normalised: roughly zero mean, unit spread
    assert abs(train.images.mean().item()) < 0.2
    assert 0.7 < train.images.std().item() < 1.3


def test_splits_are_seeded_and_stable():
    a = data.load("digits", "reward")
    data._RAW_CACHE.clear()
    b = data.load("digits", "reward")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@needs_fashion_mnist
def test_fashion_mnist_splits():
    train, reward, test = (data.load("fashion-mnist", s) for s in data.SPLITS)
    assert (len(train), len(reward), len(test)) == (55000, 5000, 10000)
    assert train.images.shape[1:] == (1, 28, 28)
    tr_idx, rw_idx = data.split_indices("fashion-mnist", 60000)
    assert len(set(tr_idx) | set(rw_idx)) == 60000 and not set(tr_idx) & set(rw_idx)
    # every class is present in the reward split, roughly balanced
    counts = torch.bincount(reward.labels, minlength=10)
    assert counts.min() > 400
    assert abs(train.images.mean().item()) < 0.05


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.load("mnist", "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.load("digits", "val")


def _write_idx(path, array: np.ndarray, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fmnist(root, n_train=60000, n_test=10000, label_max=9):
    rng = np.random.default_rng(0)
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (n_train, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, label_max + 1, n_train))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (n_test, 28, 28)))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, label_max + 1, n_test))


def test_fashion_mnist_missing_folder_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DatasetError) as err:
        data.load("fashion-mnist", "test", data_dir=missing)
    msg = str(err.value)
    assert str(missing) in msg and "apt-get install dataset-fashion-mnist" in msg


def test_fashion_mnist_missing_file(tmp_path):
    _fake_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("fashion-mnist", "test", data_dir=tmp_path)


def test_fashion_mnist_truncated_file(tmp_path):
    _fake_fmnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DatasetError, match="truncated"):
        data.load("fashion-mnist", "test", data_dir=tmp_path)


def test_fashion_mnist_short_count(tmp_path):
    _fake_fmnist(tmp_path, n_test=9000)
    with pytest.raises(data.DatasetError, match="expected 10000 items"):
        data.load("fashion-mnist", "test", data_dir=tmp_path)


def test_fashion_mnist_mislabelled(tmp_path):
    _fake_fmnist(tmp_path, label_max=12)
    with pytest.raises(data.DatasetError, match="mislabelled"):
        data.load("fashion-mnist", "test", data_dir=tmp_path)


def test_fashion_mnist_not_idx(tmp_path):
    _fake_fmnist(tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"<html>not a dataset</html>" * 10)
    with pytest.raises(data.DatasetError, match="not an unsigned-byte IDX file"):
        data.load("fashion-mnist", "test", data_dir=tmp_path)


def test_fashion_mnist_from_fake_folder_and_env_var(tmp_path, monkeypatch):
    _fake_fmnist(tmp_path)
    monkeypatch.setenv("AUTOSCULPT_DATA_DIR", str(tmp_path))
    ds = data.load("fashion-mnist", "reward")
    assert len(ds) == 5000 and ds.images.shape[1:] == (1, 28, 28)


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(data.DatasetError, match="cifar-10-batches-py"):
        data.load("cifar10", "test", data_dir=tmp_path / "nope")


def test_cifar_reads_standard_folder_and_refuses_code_in_pickles(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {
            b"data": rng.integers(0, 255, (10000, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, 10000)),
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    test_batch = {
        b"data": rng.integers(0, 255, (10000, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, 10000)],
    }
    (tmp_path / "test_batch").write_bytes(pickle.dumps(test_batch))
    ds = data.load("cifar10", "test", data_dir=tmp_path)
    assert ds.images.shape == (10000, 3, 32, 32) and len(
        data.load("cifar10", "reward", data_dir=tmp_path)
    ) == round(50000 / 12)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    data._RAW_CACHE.clear()
    with pytest.raises(data.DatasetError, match="refusing to load"):
        data.load("cifar10", "test", data_dir=tmp_path)
