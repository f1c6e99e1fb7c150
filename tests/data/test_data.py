"""Data loaders on files written here in each format, and preprocessing against torch."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from onnx_neq.data.datasets import FASHION_MNIST_DIR, load_dataset, preprocess, resize_bilinear, select_classes, split_validation
from onnx_neq.errors import NeqError


def test_resize_matches_torch_bilinear(rng):
    x = rng.random((2, 8, 8, 3)).astype(np.float32)
    for size in (32, 5):
        ours = resize_bilinear(x, size, size)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False, antialias=False
        )
        np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_preprocess_grayscale_to_normalized_rgb():
    images = np.array([[[[0], [255]], [[51], [102]]]], np.uint8)  # 1 x 2 x 2 x 1
    out = preprocess(images, (2, 2), 3, [0.5, 0.5, 0.5], [0.25, 0.5, 1.0])
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], (np.array([[0, 1], [0.2, 0.4]]) - 0.5) / 0.25, rtol=1e-6)
    np.testing.assert_allclose(out[0, 2], (np.array([[0, 1], [0.2, 0.4]]) - 0.5) / 1.0, rtol=1e-6)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path, rng):
    for prefix, n in (("train", 12), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_dataset(f"fashion-mnist:{tmp_path}")
    assert data.train.images.shape == (12, 28, 28, 1) and data.test.labels.tolist() == [0, 1, 2, 3, 4, 5]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 9]) + bytes(3)))
    with pytest.raises(NeqError, match="truncated"):
        load_dataset(f"fashion-mnist:{tmp_path}")


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_classes_5_to_9():
    data = select_classes(load_dataset("fashion-mnist"), [5, 6, 7, 8, 9])
    assert (len(data.train), len(data.test), data.num_classes) == (30000, 5000, 5)
    assert np.bincount(data.train.labels).tolist() == [6000] * 5


def test_cifar10_pickles(tmp_path, rng):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name, n in [("data_batch_1", 4), ("data_batch_2", 4), ("test_batch", 3)]:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}, f)
    data = load_dataset(f"cifar10:{tmp_path}")
    assert data.train.images.shape == (8, 32, 32, 3) and len(data.test) == 3
    raw = pickle.load(open(root / "test_batch", "rb"))[b"data"][1]
    np.testing.assert_array_equal(data.test.images[1, :, :, 0].ravel(), raw[:1024])  # red plane first


def test_npz_and_digits(tmp_path, rng):
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.random((10, 3, 6, 6)),
        y_train=np.arange(10) % 2,
        x_test=rng.random((4, 3, 6, 6)),
        y_test=np.arange(4) % 2,
    )
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert data.train.images.shape == (10, 6, 6, 3) and data.train.images.dtype == np.uint8 and data.num_classes == 2
    digits = load_dataset("digits")
    assert (len(digits.train), len(digits.test), digits.num_classes) == (1347, 450, 10)


def test_imagefolder(tmp_path, rng):
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}", (16, 16))
    assert data.train.images.shape == (4, 16, 16, 3) and data.test.labels.tolist() == [0, 0, 1, 1]


def test_validation_split_is_stratified_and_seeded():
    data = load_dataset("digits")
    train, val = split_validation(data.train, 0.2, seed=5)
    again = split_validation(data.train, 0.2, seed=5)[1]
    assert len(train) + len(val) == len(data.train) and np.array_equal(val.labels, again.labels)
    counts = np.bincount(val.labels) / np.bincount(data.train.labels)
    assert np.all(np.abs(counts - 0.2) < 0.02)
