"""Data sets for fine-tuning, as uint8 NHWC arrays in memory, preprocessed batch by batch.

--data specs:
  digits                  scikit-learn's bundled 8x8 digits (1,797 images); a fixed stratified
                          25% is the test split (seed 0), the rest is train
  fashion-mnist[:DIR]     IDX files (*-images-idx3-ubyte[.gz]); default: Debian's dataset-fashion-mnist
  cifar10:DIR, cifar100:DIR   the python batches (data_batch_*, test_batch / train, test)
  imagefolder:DIR         DIR/train/<class>/*.png|jpg and DIR/val/ or DIR/test/ (needs Pillow)
  npz:FILE                an archive written by numpy.savez / savez_compressed holding exactly
                          these four names (other members are ignored):
                            x_train, x_test  images: N x H x W (grayscale), N x H x W x C or
                                             N x C x H x W, with C = 1 or 3 and H, W, C > 0; uint8
                                             as is, or other numbers (finite) in 0..1 (scaled by
                                             255) or in 0..255 (rounded)
                            y_train, y_test  labels: N integers 0..K-1 (integer dtype, or floats
                                             that are whole numbers)
                          object arrays (pickled Python objects) are refused
  any spec + @5-9         keep classes 5-9 only, relabelled 0..4 (also: @0,2,4); a range must rise and
                          a list must name at least 2 distinct classes, none negative

Labels are the integers 0..K-1 and every one of them has training images; a test label outside the
train split's classes is an error.

Every file is untrusted: only regular files are opened (never a named pipe or device), nothing is
unpickled beyond the dicts, lists, bytes, ints and numeric arrays of a CIFAR batch (no code runs),
an image folder's files and class folders must resolve inside the folder (no link out of it), and
declared sizes are checked against the bytes present before anything is allocated. Limits:
  MAX_ELEMENTS (2**31)    elements in one IDX file, npz member or CIFAR batch array, and the size
                          of one CIFAR batch file in bytes
  MAX_CLASSES (100,000)   classes in one @/--classes list or range
  images                  Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, about 89
                          million pixels by default): a larger image is an error, not a warning

Images are resized (bilinear) to the model's input, grayscale is repeated to 3 channels when the
model wants 3, and (x/255 - mean) / std is applied as the manifest says. A validation split
(20% of train, stratified, seeded by the run) is held out for the velocity set and model choice;
the test split is only ever reported.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from onnx_neq.data.cifar_pickle import MAX_ARRAY_VALUES, unpickle_batch
from onnx_neq.errors import NeqError, environment_error

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPECS = ("digits", "fashion-mnist[:DIR]", "cifar10:DIR", "cifar100:DIR", "imagefolder:DIR", "npz:FILE")
MAX_ELEMENTS = MAX_ARRAY_VALUES  # elements in one array read from a file (IDX file, npz member, CIFAR batch); bytes in one CIFAR batch file
MAX_CLASSES = 100_000  # classes in one --classes / @ list or range
CLASS_FORMS = "give a rising range like 5-9 or a list of distinct classes like 0,2,4 (at least 2, none negative)"
IDX_CHUNK = 1 << 20  # bytes read from an IDX stream at a time
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


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
    spec, at, subset = spec.partition("@")
    classes = parse_classes(subset) if at else None
    data = _load(spec, size)
    return select_classes(data, classes) if classes else data


def parse_classes(text: str) -> list[int]:
    """'5-9' -> [5, 6, 7, 8, 9]; '0,2,4' -> [0, 2, 4]; a reversed range, a repeat, a negative or fewer than 2 classes -> NeqError."""
    if "--" in text.replace(" ", "") or any(part.strip().startswith("-") for part in text.split(",")):
        raise NeqError(f"classes {text!r}: a class is never negative; {CLASS_FORMS}")
    low, dash, high = text.partition("-")
    try:
        bounds = (int(low), int(high)) if dash else None
        classes = None if dash else [int(v) for v in text.split(",")]
    except ValueError:
        raise NeqError(f"classes {text!r} are neither a range nor a list; {CLASS_FORMS}") from None
    if bounds:
        if bounds[1] < bounds[0]:
            raise NeqError(f"classes {text!r}: the range runs backwards (write {bounds[1]}-{bounds[0]}); {CLASS_FORMS}")
        if bounds[1] - bounds[0] >= MAX_CLASSES:
            raise NeqError(f"classes {text!r}: the range spans more than {MAX_CLASSES:,} classes; {CLASS_FORMS}")
        classes = list(range(bounds[0], bounds[1] + 1))
    _check_class_list(text, classes)
    return classes


def _check_class_list(text: str, classes: list[int]) -> None:
    """NeqError unless `classes` are at least 2 distinct non-negative integers (at most MAX_CLASSES)."""
    problem = _class_list_problem(classes)
    if problem:
        raise NeqError(f"classes {text!r}: {problem}; {CLASS_FORMS}")


def _class_list_problem(classes: list[int]) -> str | None:
    if len(classes) > MAX_CLASSES:
        return f"{len(classes):,} classes are more than {MAX_CLASSES:,}"
    if len(classes) < 2:
        return f"{len(classes)} class{'' if len(classes) == 1 else 'es'} cannot be trained (at least 2 are needed)"
    if min(classes) < 0:
        return f"class {min(classes)} is negative"
    seen: set[int] = set()
    for c in classes:
        if c in seen:
            return f"class {c} is named more than once"
        seen.add(c)
    return None


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
    """The class count K: train labels are exactly the integers 0..K-1, every one present; test labels are among them."""
    for name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise NeqError(f"{spec}: the {name} split is empty")
        if len(split.images) != len(split.labels):
            raise NeqError(f"{spec}: the {name} split has {len(split.images)} images but {len(split.labels)} labels")
    present = np.unique(train.labels)
    lowest = min(int(present[0]), int(test.labels.min()))
    if lowest < 0:
        raise NeqError(f"{spec}: labels must be the integers 0..K-1, but {lowest} occurs")
    top = int(present[-1])
    if top >= len(present):  # fewer distinct labels than 0..top: some class has no training image
        absent = top + 1 - len(present)
        missing = np.setdiff1d(np.arange(min(top, len(present) + 5)), present)[:5]  # sized by the label count, not the label
        raise NeqError(
            f"{spec}: train labels run to {top} but {absent:,} class{'es' if absent > 1 else ''} below it never occur in the train split "
            f"({_shown(missing, absent)}); labels must be 0..K-1 with every class in train"
        )
    unknown = np.unique(test.labels[test.labels > top])
    if unknown.size:
        raise NeqError(
            f"{spec}: test labels {_shown(unknown, unknown.size)} never occur in the train split (classes 0..{top}); "
            f"every test class needs training images"
        )
    if top < 1:
        raise NeqError(f"{spec}: every label is 0; a classifier needs at least 2 classes")
    return top + 1


def _shown(values: np.ndarray, total: int) -> str:
    return ", ".join(map(str, values[:5].tolist())) + (" ..." if total > 5 else "")


def select_classes(data: Dataset, classes: list[int]) -> Dataset:
    """Keep only `classes`, relabelled 0..k-1 in the order given (e.g. Fashion-MNIST 5-9)."""
    _check_class_list(",".join(map(str, classes)), list(classes))
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
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), 3)
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), 1)
    return Split(images[..., None], labels.astype(np.int64))


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (root / name).exists():
            return _regular_file(root / name, "IDX file")
    raise NeqError(f"{root} has no {stem}[.gz]; expected the four Fashion-MNIST IDX files there")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions: header first, then exactly the declared bytes, read in chunks."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as stream:
            shape = _idx_shape(path, stream, ndim)
            body = _read_exactly(path, stream, math.prod(shape), shape)
            if stream.read(1):
                raise NeqError(
                    f"{path} has data after the {math.prod(shape):,} bytes its header declares (shape {shape}); download it again"
                )
    except EOFError:
        raise NeqError(f"{path} is truncated (its compressed stream ends early); download it again") from None
    except (OSError, zlib.error) as exc:
        raise NeqError(f"cannot read {path}: {_reason(exc)}; download it again") from None
    return np.frombuffer(body, np.uint8).reshape(shape)


def _idx_shape(path: Path, stream, ndim: int) -> tuple[int, ...]:
    magic = stream.read(4)
    if len(magic) < 4 or magic[:3] != bytes([0, 0, 8]) or magic[3] != ndim:
        raise NeqError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimension{'s' if ndim > 1 else ''}; pass the Fashion-MNIST files"
        )
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise NeqError(f"{path} is truncated: its header ends early; download it again")
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
    if not 0 < math.prod(shape) <= MAX_ELEMENTS:
        raise NeqError(
            f"{path} declares shape {shape}, {math.prod(shape):,} bytes; an IDX file here holds 1 to {MAX_ELEMENTS:,}: pass a genuine one"
        )
    return shape


def _read_exactly(path: Path, stream, count: int, shape: tuple[int, ...]) -> bytearray:
    """`count` bytes of `stream`, read in chunks so that memory grows only with the bytes actually there."""
    body = bytearray()
    while len(body) < count:
        chunk = stream.read(min(IDX_CHUNK, count - len(body)))
        if not chunk:
            raise NeqError(f"{path} is truncated: {len(body):,} bytes for shape {shape}; download it again")
        body += chunk
    return body


def _regular_file(path: Path, what: str, fix: str = "pass a data file") -> Path:
    """`path` if it is a regular file (links followed); a folder, named pipe or device is never opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NeqError(f"{what} {path} does not exist{' (a broken link)' if path.is_symlink() else ''}") from None
    except OSError as exc:
        raise environment_error(exc, "read") from None
    if not stat.S_ISREG(mode):
        raise NeqError(f"{what} {path} is not a regular file (a folder, named pipe or device); {fix}")
    return path


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:100] if text.strip() else exc.__class__.__name__


# CIFAR python batches: unpickled by an allow-list, never by pickle.load --------------------------------


def _cifar_dir(path: str, marker: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise NeqError(f"CIFAR directory {root} does not exist")
    for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if (candidate / marker).exists():
            return candidate
    raise NeqError(f"{root} holds no CIFAR python pickle '{marker}'; pass the folder of the python version (e.g. cifar-10-batches-py)")


def _cifar_batch(path: Path, label_key: bytes) -> Split:
    size = _regular_file(path, "CIFAR batch").stat().st_size
    if size > MAX_ELEMENTS:
        raise NeqError(
            f"{path} has {size:,} bytes, more than a CIFAR python batch (at most {MAX_ELEMENTS:,}); pass the python version's files"
        )
    raw = path.read_bytes()
    try:
        batch = unpickle_batch(path, raw)
    except NeqError:
        raise
    except Exception as exc:  # truncated, not a pickle, a refused dtype/shape, a non-callable reduced
        raise NeqError(f"{path} is not a CIFAR python batch ({_reason(exc)}); pass the folder of the python version") from None
    return _cifar_arrays(path, batch, label_key)


def _cifar_arrays(path: Path, batch, label_key: bytes) -> Split:
    """The batch's b'data' (uint8 N x 3072, planes R, G, B) as N x 32 x 32 x 3 and its N integer labels."""
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise NeqError(f"{path} is not a CIFAR python batch: expected a dict with b'data' and {label_key!r}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise NeqError(f"{path} is not a CIFAR python batch: b'data' is not a uint8 N x 3072 array; pass the python version's files")
    labels = _cifar_labels(batch[label_key])
    if labels is None or len(labels) != len(data):
        raise NeqError(f"{path} is not a CIFAR python batch: {label_key!r} is not a list of {len(data)} integer labels, one per image")
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)


def _cifar_labels(value) -> np.ndarray | None:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.int64)
    if isinstance(value, list) and all(type(v) is int and -(2**63) <= v < 2**63 for v in value):
        return np.array(value, np.int64).reshape(-1)
    return None


def _cifar_split(batches: list[Split]) -> Split:
    images = np.concatenate([b.images for b in batches])
    return Split(np.ascontiguousarray(images), np.concatenate([b.labels for b in batches]))


def _cifar10(path: str) -> tuple[Split, Split]:
    root = _cifar_dir(path, "data_batch_1")
    train = [_cifar_batch(root / f"data_batch_{i}", b"labels") for i in range(1, 6) if (root / f"data_batch_{i}").exists()]
    return _cifar_split(train), _cifar_split([_cifar_batch(root / "test_batch", b"labels")])


def _cifar100(path: str) -> tuple[Split, Split]:
    root = _cifar_dir(path, "train")
    return _cifar_split([_cifar_batch(root / "train", b"fine_labels")]), _cifar_split([_cifar_batch(root / "test", b"fine_labels")])


# image folders ---------------------------------------------------------------------------------------


def _imagefolder(path: str, size: tuple[int, int] | None) -> tuple[Split, Split]:
    root = Path(path)
    if not (root / "train").is_dir():
        raise NeqError(f"image folder {root} needs a train/ subfolder (and val/ or test/), one folder per class")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise NeqError(f"image folder {root} needs a val/ or test/ subfolder beside train/")
    base = root.resolve()
    classes = sorted(p.name for p in _inside(base, root / "train").iterdir() if p.is_dir())
    if not classes:
        raise NeqError(f"{root / 'train'} has no class subfolders")
    return _read_folder(base, root / "train", classes, size), _read_folder(base, _inside(base, test_dir), classes, size)


def _inside(base: Path, path: Path) -> Path:
    """`path` when it resolves inside the data folder `base`; a link out of it is an error naming it."""
    target = path.resolve()
    if not target.is_relative_to(base):
        raise NeqError(f"{path} leads to {target}, outside the data folder {base}; copy the data into the folder instead of linking it")
    return path


def _read_folder(base: Path, folder: Path, classes: list[str], size: tuple[int, int] | None) -> Split:
    try:
        from PIL import Image
    except ImportError:
        raise NeqError("imagefolder data needs Pillow: pip install pillow") from None
    size = tuple(size or (224, 224))
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(_inside(base, folder / name).glob("*")):
            if file.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
                images.append(_read_image(Image, _regular_file(_inside(base, file), "image", "remove it from the image folder"), size))
                labels.append(label)
    if not images:
        raise NeqError(f"{folder} holds no images (.png, .jpg, .jpeg, .bmp, .webp)")
    return Split(np.stack(images), np.array(labels, np.int64))


def _read_image(image_module, file: Path, size: tuple[int, int]) -> np.ndarray:
    """Decode one image; Pillow's decompression-bomb warning is an error here, as is its decompression-bomb error."""
    bombs = (image_module.DecompressionBombWarning, image_module.DecompressionBombError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image_module.DecompressionBombWarning)
            with image_module.open(file) as img:
                return np.asarray(img.convert("RGB").resize((size[1], size[0]), image_module.BILINEAR))
    except bombs as exc:
        raise NeqError(
            f"{file} is too large to decode safely ({_reason(exc)}); shrink it below {image_module.MAX_IMAGE_PIXELS:,} pixels"
        ) from None
    except Exception as exc:
        raise NeqError(f"{file} is not a readable image ({_reason(exc)})") from None


# npz archives: each member's .npy header is checked before numpy reads it ----------------------------------


def _npz(path: str) -> tuple[Split, Split]:
    file = _regular_file(Path(path), "npz file", "pass an archive written by numpy.savez")
    try:
        with zipfile.ZipFile(file) as archive:
            missing = [k for k in NPZ_ARRAYS if f"{k}.npy" not in archive.namelist()]
            if missing:
                raise NeqError(f"{file} lacks arrays {missing}; expected x_train, y_train, x_test, y_test")
            arrays = {k: _npz_member(file, archive, k) for k in NPZ_ARRAYS}
    except NeqError:
        raise
    except Exception as exc:  # not a zip, a truncated zip, a damaged member
        raise NeqError(f"{file} is not a readable .npz archive ({_reason(exc)}); write one with numpy.savez") from None
    return _npz_split(file, "train", arrays["x_train"], arrays["y_train"]), _npz_split(file, "test", arrays["x_test"], arrays["y_test"])


def _npz_member(file: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    info = archive.getinfo(f"{name}.npy")
    with archive.open(info) as member:
        _check_npy_header(f"{file} ({name})", member, info.file_size)
    with archive.open(info) as member:
        return npy_format.read_array(member, allow_pickle=False)


def _check_npy_header(where: str, member, stored: int) -> None:
    """A member's declared shape and dtype against its uncompressed size and MAX_ELEMENTS, before numpy allocates for it."""
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    version = npy_format.read_magic(member)
    if version not in readers:
        raise NeqError(f"{where}: .npy format version {version[0]}.{version[1]} is not read here; save plain arrays with numpy.savez")
    shape, _, dtype = readers[version](member)
    if dtype.hasobject:
        raise NeqError(f"{where}: an array of Python objects ({dtype}), which onnx-neq never unpickles; save numeric arrays")
    count = math.prod(shape)
    if min(shape, default=0) < 0 or count > MAX_ELEMENTS:
        raise NeqError(f"{where}: declares shape {shape}, more than {MAX_ELEMENTS:,} elements; use a smaller data set")
    if count * dtype.itemsize > stored - member.tell():
        raise NeqError(
            f"{where}: declares shape {shape} of {dtype} ({count * dtype.itemsize:,} bytes) but the member holds "
            f"{max(stored - member.tell(), 0):,}; the archive is damaged: write it again with numpy.savez"
        )


def _npz_split(file: Path, name: str, x: np.ndarray, y: np.ndarray) -> Split:
    where = f"{file} ({name})"
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise NeqError(f"{where}: images have shape {x.shape}; expected N x H x W, N x H x W x C or N x C x H x W")
    if x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if 0 in x.shape[1:] or x.shape[3] not in (1, 3):
        raise NeqError(f"{where}: images of height, width and channels {x.shape[1:]}; expected H, W > 0 and 1 or 3 channels")
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
