"""Data sets for fine-tuning, as uint8 NHWC arrays in memory, preprocessed batch by batch.

--data specs:
  digits                  scikit-learn's bundled 8x8 digits (1,797 images); a fixed stratified
                          25% is the test split (seed 0), the rest is train
  fashion-mnist[:DIR]     IDX files (*-images-idx3-ubyte[.gz]); default: Debian's dataset-fashion-mnist
  cifar10:DIR, cifar100:DIR   the python pickles (data_batch_*, test_batch / train, test)
  imagefolder:DIR         DIR/train/<class>/*.png|jpg and DIR/val/ or DIR/test/ (needs Pillow)
  npz:FILE                arrays x_train, y_train, x_test, y_test (NHWC, NCHW or NHW)
  any spec + @5-9         keep classes 5-9 only, relabelled 0..4 (also: @0,2,4)

Images are resized (bilinear) to the model's input, grayscale is repeated to 3 channels when the
model wants 3, and (x/255 - mean) / std is applied as the manifest says. A validation split
(20% of train, stratified, seeded by the run) is held out for the velocity set and model choice;
the test split is only ever reported.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import NeqError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPECS = ("digits", "fashion-mnist[:DIR]", "cifar10:DIR", "cifar100:DIR", "imagefolder:DIR", "npz:FILE")


@dataclass
class Split:
    images: np.ndarray  # uint8, N x H x W x C
    labels: np.ndarray  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int


def load_dataset(spec: str, size: tuple[int, int] | None = None) -> Dataset:
    """Load a data set from a --data spec (see the module docstring); a suffix @5-9 keeps classes 5-9.
    `size`: the model's (height, width), at which an image folder is decoded."""
    spec, _, subset = spec.partition("@")
    data = _load(spec, size)
    return select_classes(data, parse_classes(subset)) if subset else data


def parse_classes(text: str) -> list[int]:
    """'5-9' or '5,6,7' -> [5, 6, 7, ...]."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise NeqError(f"classes are a range like 5-9 or a list like 0,2,4, not {text!r}") from None


def _load(spec: str, size: tuple[int, int] | None) -> Dataset:
    kind, _, path = spec.partition(":")
    loaders = {
        "digits": _digits,
        "fashion-mnist": _fashion_mnist,
        "cifar10": _cifar10,
        "cifar100": _cifar100,
        "imagefolder": lambda p: _imagefolder(p, size),
        "npz": _npz,
    }
    if kind not in loaders:
        raise NeqError(f"unknown data spec {spec!r}; use one of: {', '.join(SPECS)}")
    if kind in ("cifar10", "cifar100", "imagefolder", "npz") and not path:
        raise NeqError(f"--data {kind} needs a path: {kind}:{'FILE' if kind == 'npz' else 'DIR'}")
    train, test = loaders[kind](path)
    return Dataset(spec, train, test, check_labels(spec, train, test))


def check_labels(spec: str, train: Split, test: Split) -> int:
    """The class count K of a data set whose labels are exactly the integers 0..K-1; else NeqError."""
    for name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise NeqError(f"{spec}: the {name} split is empty")
        if len(split.images) != len(split.labels):
            raise NeqError(f"{spec}: the {name} split has {len(split.images)} images but {len(split.labels)} labels")
    labels = np.concatenate([train.labels, test.labels])
    present = np.unique(labels)
    missing = np.setdiff1d(np.arange(int(present.max()) + 1), present)
    if present.min() < 0:
        raise NeqError(f"{spec}: labels must be the integers 0..K-1, but {int(present.min())} occurs")
    if missing.size:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if missing.size > 5 else "")
        raise NeqError(
            f"{spec}: labels run to {int(present.max())} but {missing.size} classes below it never occur ({shown}); "
            f"labels must be 0..K-1 with every class present"
        )
    return int(present.max()) + 1


def select_classes(data: Dataset, classes: list[int]) -> Dataset:
    """Keep only `classes`, relabelled 0..k-1 in the order given (e.g. Fashion-MNIST 5-9)."""
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise NeqError(f"--classes {bad} not in {data.name}, which has classes 0..{data.num_classes - 1}")
    lookup = np.full(data.num_classes, -1, np.int64)
    lookup[classes] = np.arange(len(classes))

    def keep(split: Split) -> Split:
        chosen = np.flatnonzero(lookup[split.labels] >= 0)
        return Split(split.images[chosen], lookup[split.labels[chosen]])

    return Dataset(f"{data.name} classes {','.join(map(str, classes))}", keep(data.train), keep(data.test), len(classes))


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified hold-out: (train, validation)."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(train.labels):
        members = rng.permutation(np.flatnonzero(train.labels == c))
        val.extend(members[: int(round(len(members) * fraction))])
    val_index = np.sort(np.array(val, np.int64))
    train_index = np.setdiff1d(np.arange(len(train)), val_index)
    return train.take(train_index), train.take(val_index)


def preprocess(images: np.ndarray, size: tuple[int, int], channels: int, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW at the model's (height, width), normalized."""
    x = images.astype(np.float32) / 255.0
    if x.shape[1:3] != tuple(size):
        x = resize_bilinear(x, *size)
    if x.shape[3] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=3)
    elif x.shape[3] != channels:
        raise NeqError(f"images have {x.shape[3]} channels; the model wants {channels}")
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of N x H x W x C float images (half-pixel centers, as PIL and torch use)."""
    ys, y0, y1 = _axis(x.shape[1], height)
    xs, x0, x1 = _axis(x.shape[2], width)
    top = x[:, y0][:, :, x0] * (1 - xs)[None, None, :, None] + x[:, y0][:, :, x1] * xs[None, None, :, None]
    bottom = x[:, y1][:, :, x0] * (1 - xs)[None, None, :, None] + x[:, y1][:, :, x1] * xs[None, None, :, None]
    return top * (1 - ys)[None, :, None, None] + bottom * ys[None, :, None, None]


def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return (pos - lo).astype(np.float32), lo, hi


# loaders --------------------------------------------------------------------------------------


def _digits(_: str) -> tuple[Split, Split]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise NeqError("--data digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    full = Split(images, bunch.target.astype(np.int64))
    train, test = split_validation(full, 0.25, seed=0)
    return train, test


def _fashion_mnist(path: str) -> tuple[Split, Split]:
    root = Path(path) if path else FASHION_MNIST_DIR
    if not root.is_dir():
        hint = (
            "install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)"
            if not path
            else "pass the folder holding the IDX files"
        )
        raise NeqError(f"Fashion-MNIST directory {root} does not exist; {hint}")
    return _idx_split(root, "train"), _idx_split(root, "t10k")


def _idx_split(root: Path, prefix: str) -> Split:
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    return Split(images[..., None], labels.astype(np.int64))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return root / name
    raise NeqError(f"{root} has no {stem}[.gz]; expected the four Fashion-MNIST IDX files there")


def _read_idx(path: Path) -> np.ndarray:
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise NeqError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise NeqError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def _cifar_dir(path: str, marker: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise NeqError(f"CIFAR directory {root} does not exist")
    for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if (candidate / marker).exists():
            return candidate
    raise NeqError(f"{root} holds no CIFAR python pickle '{marker}'; pass the folder of the python version (e.g. cifar-10-batches-py)")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        if not isinstance(batch, dict) or b"data" not in batch:
            raise ValueError("not a dict with b'data'")
        return batch
    except Exception as exc:
        raise NeqError(
            f"{path} is not a CIFAR python pickle ({str(exc).splitlines()[0][:100] if str(exc) else exc.__class__.__name__})"
        ) from None


def _cifar_split(batches: list[dict], label_key: bytes) -> Split:
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches]).astype(np.int64)
    return Split(np.ascontiguousarray(images), labels)


def _cifar10(path: str) -> tuple[Split, Split]:
    root = _cifar_dir(path, "data_batch_1")
    train = [_unpickle(root / f"data_batch_{i}") for i in range(1, 6) if (root / f"data_batch_{i}").exists()]
    return _cifar_split(train, b"labels"), _cifar_split([_unpickle(root / "test_batch")], b"labels")


def _cifar100(path: str) -> tuple[Split, Split]:
    root = _cifar_dir(path, "train")
    return _cifar_split([_unpickle(root / "train")], b"fine_labels"), _cifar_split([_unpickle(root / "test")], b"fine_labels")


def _imagefolder(path: str, size: tuple[int, int] | None) -> tuple[Split, Split]:
    root = Path(path)
    if not (root / "train").is_dir():
        raise NeqError(f"image folder {root} needs a train/ subfolder (and val/ or test/), one folder per class")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise NeqError(f"image folder {root} needs a val/ or test/ subfolder beside train/")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise NeqError(f"{root / 'train'} has no class subfolders")
    return _read_folder(root / "train", classes, size), _read_folder(test_dir, classes, size)


def _read_folder(folder: Path, classes: list[str], size: tuple[int, int] | None) -> Split:
    try:
        from PIL import Image
    except ImportError:
        raise NeqError("imagefolder data needs Pillow: pip install pillow") from None
    size = tuple(size or (224, 224))
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((folder / name).glob("*")):
            if file.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
                images.append(_read_image(Image, file, size))
                labels.append(label)
    if not images:
        raise NeqError(f"{folder} holds no images (.png, .jpg, .jpeg, .bmp, .webp)")
    return Split(np.stack(images), np.array(labels, np.int64))


def _read_image(image_module, file: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        with image_module.open(file) as img:
            return np.asarray(img.convert("RGB").resize((size[1], size[0]), image_module.BILINEAR))
    except Exception as exc:
        raise NeqError(
            f"{file} is not a readable image ({str(exc).splitlines()[0][:100] if str(exc) else exc.__class__.__name__})"
        ) from None


def _npz(path: str) -> tuple[Split, Split]:
    file = Path(path)
    if not file.is_file():
        raise NeqError(f"npz file {file} does not exist")
    try:
        with np.load(file, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an archive")
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise NeqError(f"{file} lacks arrays {missing}; expected x_train, y_train, x_test, y_test")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except NeqError:
        raise
    except Exception as exc:  # not a zip, a truncated zip, pickled objects, a lone .npy
        raise NeqError(f"{file} is not a readable .npz archive ({str(exc).splitlines()[0][:100]}); write one with numpy.savez") from None
    return _npz_split(file, "train", arrays["x_train"], arrays["y_train"]), _npz_split(file, "test", arrays["x_test"], arrays["y_test"])


def _npz_split(file: Path, name: str, x: np.ndarray, y: np.ndarray) -> Split:
    where = f"{file} ({name})"
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise NeqError(f"{where}: images have shape {x.shape}; expected N x H x W (x C) or N x C x H x W")
    if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(_to_uint8(where, x)), _integer_labels(where, y))


def _to_uint8(where: str, x: np.ndarray) -> np.ndarray:
    """uint8 as is; other numbers must be finite and within 0..1 (scaled by 255) or 0..255."""
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise NeqError(f"{where}: images of dtype {x.dtype}; expected numbers")
    finite = np.isfinite(x)
    if not finite.all():
        raise NeqError(f"{where}: {int((~finite).sum())} pixel values are NaN or infinite; clean the images first")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 255:
        raise NeqError(f"{where}: pixel values span {low:g}..{high:g}; expected 0..1 or 0..255")
    return np.clip(np.round(x * 255.0 if high <= 1.0 else x), 0, 255).astype(np.uint8)


def _integer_labels(where: str, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise NeqError(f"{where}: labels of dtype {y.dtype}; expected integers 0..K-1")
    if not np.issubdtype(y.dtype, np.integer):
        bad = ~np.isfinite(y) | (y != np.round(np.nan_to_num(y)))
        if bad.any():
            raise NeqError(f"{where}: {int(bad.sum())} labels are not integers (e.g. {y[bad][0]}); expected integers 0..K-1")
    return y.astype(np.int64)
