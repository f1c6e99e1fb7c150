"""Data files are untrusted: nothing is unpickled or executed, nothing is allocated for sizes the bytes do not back,
no named pipe is opened, no link leads out of the data folder, and class subsets and labels are what they say."""

from __future__ import annotations

import builtins
import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy_format

from onnx_neq.data import datasets as data_module
from onnx_neq.data.datasets import Split, check_labels, load_dataset, parse_classes, select_classes
from onnx_neq.errors import NeqError


def _peak(call) -> tuple[BaseException | None, int]:
    """(the exception `call` raised, if any; the peak of traced memory while it ran, in bytes)."""
    tracemalloc.start()
    try:
        call()
        error = None
    except Exception as exc:  # the test asserts on it
        error = exc
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return error, peak


def _load_in_subprocess(spec: str) -> subprocess.CompletedProcess:
    """load_dataset in a child, which must return within 60 s (a named pipe opened for reading blocks forever)."""
    code = (
        "import sys\nfrom onnx_neq.data.datasets import load_dataset\nfrom onnx_neq.errors import NeqError\n"
        "try:\n    load_dataset(sys.argv[1], (8, 8))\nexcept NeqError as exc:\n    sys.exit(f'NeqError: {exc}')\n"
    )
    return subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=60)


# 1. CIFAR python batches: a restricted unpickler ------------------------------------------------------


class _Reduces:
    """Pickles as a call of `func(*args)`: what a crafted batch file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def with_state(self, state) -> _Reduces:
        self.state = state
        return self

    def __reduce__(self):
        return (self.func, self.args, self.state) if hasattr(self, "state") else (self.func, self.args)


def _cifar10_dir(tmp_path, batch: dict, protocol: int = 2):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in ("data_batch_1", "test_batch"):
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "subprocess.call"])
def test_cifar_batch_that_runs_a_command_is_refused_and_runs_nothing(tmp_path, how, protocol):
    marker = tmp_path / "marker"
    payload = {
        "os.system": _Reduces(os.system, f"touch {marker}"),
        "builtins.exec": _Reduces(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": _Reduces(subprocess.call, ["touch", str(marker)]),
    }[how]
    _cifar10_dir(tmp_path, {b"data": payload, b"labels": [0]}, protocol)
    with pytest.raises(NeqError, match="is not a CIFAR python batch: it refers to .*, which onnx-neq never loads") as info:
        load_dataset(f"cifar10:{tmp_path}")
    assert not marker.exists()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("func,name", [(np.load, "numpy.load"), (builtins.eval, "builtins.eval")])
def test_cifar_batch_reducing_to_numpy_load_or_eval_is_refused(tmp_path, func, name):
    marker = tmp_path / "marker"
    arg = str(tmp_path / "payload.npy") if func is np.load else f"open({str(marker)!r}, 'w').close()"
    _cifar10_dir(tmp_path, {b"data": _Reduces(func, arg), b"labels": [0]}, 4)
    with pytest.raises(NeqError, match=f"it refers to {name}, which onnx-neq never loads"):
        load_dataset(f"cifar10:{tmp_path}")
    assert not marker.exists()


class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2's str (SHORT_BINSTRING / BINSTRING), as CIFAR's own batches were written."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_string(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else pickle.BINSTRING + struct.pack("<i", len(raw))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_string
    dispatch[str] = _save_string


def _dump(batch: dict, protocol) -> bytes:
    if protocol == "python2":
        out = io.BytesIO()
        _Python2Pickler(out, protocol=2).dump(batch)
        return out.getvalue()
    return pickle.dumps(batch, protocol=protocol)


@pytest.mark.parametrize("protocol", ["python2", 2, 4, 5])
@pytest.mark.parametrize("layout", ["cifar10", "cifar100"])
def test_genuine_cifar_batches_still_load(tmp_path, rng, layout, protocol):
    root = tmp_path / ("cifar-10-batches-py" if layout == "cifar10" else "cifar-100-python")
    root.mkdir()
    names = {"cifar10": [("data_batch_1", 4), ("data_batch_2", 4), ("test_batch", 3)], "cifar100": [("train", 6), ("test", 3)]}[layout]
    key = b"labels" if layout == "cifar10" else b"fine_labels"
    raw = {}
    for name, n in names:
        raw[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {
            b"batch_label": b"batch " + name.encode(),
            b"data": raw[name],
            key: [i % 3 for i in range(n)],
            b"filenames": [b"x.png"] * n,
        }
        if layout == "cifar100":
            batch[b"coarse_labels"] = [0] * n
        (root / name).write_bytes(_dump(batch, protocol))
    data = load_dataset(f"{layout}:{tmp_path}")
    train_raw = np.concatenate([raw[name] for name, _ in names[:-1]])
    assert data.train.images.shape == (len(train_raw), 32, 32, 3) and data.num_classes == 3
    np.testing.assert_array_equal(data.train.images.transpose(0, 3, 1, 2).reshape(len(train_raw), 3072), train_raw)
    np.testing.assert_array_equal(data.test.images[1, :, :, 0].ravel(), raw[names[-1][0]][1, :1024])  # red plane first
    assert data.test.labels.tolist() == [0, 1, 2]


def _pickle_ops(*ops: bytes) -> bytes:
    return b"\x80\x04" + b"".join(ops) + b"."


@pytest.mark.parametrize(
    "case",
    [
        "memo slot 2**28",  # the C unpickler would allocate and clear 4 GiB of memo
        "bytes8 of 2**40",  # ... would allocate 1 TiB before reading
        "numpy.ndarray((2**40,))",  # the class itself would allocate
        "_reconstruct state of 2**40 bytes",
        "object dtype",
    ],
)
def test_cifar_batch_declaring_huge_sizes_is_refused_without_allocating(tmp_path, case):
    if case == "memo slot 2**28":
        raw = _pickle_ops(b"N", b"r" + struct.pack("<I", 2**28))
    elif case == "bytes8 of 2**40":
        raw = _pickle_ops(b"\x8e" + struct.pack("<Q", 2**40) + b"abc")
    elif case == "numpy.ndarray((2**40,))":
        raw = pickle.dumps({b"data": _Reduces(np.ndarray, (2**40,), np.uint8), b"labels": [0]}, protocol=4)
    elif case == "object dtype":
        raw = pickle.dumps({b"data": np.array([1, "x"], object), b"labels": [0, 1]}, protocol=4)
    else:  # numpy's own reduction of an ndarray, whose state claims 2**40 bytes but holds 3
        reconstruct, args, _ = np.zeros(1, np.uint8).__reduce__()
        state = (1, (2**28, 4096), np.dtype(np.uint8), False, b"abc")
        raw = pickle.dumps({b"data": _Reduces(reconstruct, *args).with_state(state), b"labels": [0]}, protocol=4)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "data_batch_1").write_bytes(raw)
    error, peak = _peak(lambda: load_dataset(f"cifar10:{tmp_path}"))
    assert peak < 20 * 2**20, (peak, error)
    assert isinstance(error, NeqError) and "is not a CIFAR python batch" in str(error), error


def test_cifar_batch_of_the_wrong_shape_or_label_count_is_refused(tmp_path, rng):
    _cifar10_dir(tmp_path, {b"data": rng.integers(0, 256, (2, 1000), dtype=np.uint8), b"labels": [0, 1]})
    with pytest.raises(NeqError, match="b'data' is not a uint8 N x 3072 array"):
        load_dataset(f"cifar10:{tmp_path}")
    (tmp_path / "other").mkdir()
    _cifar10_dir(tmp_path / "other", {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(NeqError, match="is not a list of 2 integer labels"):
        load_dataset(f"cifar10:{tmp_path / 'other'}")


# 2. IDX files: header first, then exactly the declared bytes ------------------------------------------


def _idx_header(*shape: int) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)


def _fashion_dir(tmp_path, rng):
    for prefix, n in (("train", 12), ("t10k", 6)):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx_header(n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(_idx_header(n) + bytes(i % 10 for i in range(n)))
    return tmp_path


def _gzip_with_zeros(path, head: bytes, megabytes: int) -> None:
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(head)
        for _ in range(megabytes):
            f.write(bytes(2**20))


def test_idx_header_declaring_2_40_elements_is_refused_before_the_body(tmp_path, rng):
    _fashion_dir(tmp_path, rng)
    _gzip_with_zeros(tmp_path / "train-images-idx3-ubyte.gz", _idx_header(2**20, 2**10, 2**10), 20)
    error, peak = _peak(lambda: load_dataset(f"fashion-mnist:{tmp_path}"))
    assert peak < 2 * 2**20, (peak, error)
    assert isinstance(error, NeqError) and "declares shape (1048576, 1024, 1024)" in str(error), error


def test_idx_file_with_50_mb_of_trailing_zeros_is_refused_without_reading_them(tmp_path, rng):
    _fashion_dir(tmp_path, rng)
    _gzip_with_zeros(tmp_path / "train-images-idx3-ubyte.gz", _idx_header(12, 28, 28) + bytes(12 * 784), 50)
    error, peak = _peak(lambda: load_dataset(f"fashion-mnist:{tmp_path}"))
    assert peak < 20 * 2**20, (peak, error)
    assert isinstance(error, NeqError) and "has data after the 9,408 bytes its header declares" in str(error), error


@pytest.mark.parametrize("how", ["plain file short", "gzip stream cut", "empty header"])
def test_truncated_idx_files_are_errors(tmp_path, rng, how):
    _fashion_dir(tmp_path, rng)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    if how == "plain file short":
        labels.unlink()
        (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_header(6) + bytes(3))
    elif how == "gzip stream cut":
        labels.write_bytes(gzip.compress(_idx_header(6) + bytes(range(6)))[:-12])
    else:
        labels.write_bytes(gzip.compress(bytes([0, 0, 8])))
    with pytest.raises(NeqError, match="truncated|not an IDX file"):
        load_dataset(f"fashion-mnist:{tmp_path}")


def test_idx_named_pipe_is_refused_not_opened(tmp_path, rng):
    _fashion_dir(tmp_path, rng)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    os.mkfifo(tmp_path / "train-labels-idx1-ubyte")
    result = _load_in_subprocess(f"fashion-mnist:{tmp_path}")
    assert result.returncode == 1 and "NeqError" in result.stderr and "is not a regular file" in result.stderr, result.stderr


# 3. image folders: regular files only, nothing outside the folder, no decompression bombs --------------


def _image_folder(root, rng):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_named_pipe_in_a_class_folder_is_an_error_not_a_hang(tmp_path, rng):
    pytest.importorskip("PIL.Image")
    root = _image_folder(tmp_path / "data", rng)
    os.mkfifo(root / "train" / "cat" / "x.png")
    result = _load_in_subprocess(f"imagefolder:{root}")
    assert result.returncode == 1 and "NeqError" in result.stderr, result.stderr
    assert "x.png is not a regular file" in result.stderr and "remove it from the image folder" in result.stderr


@pytest.mark.parametrize("what", ["file", "class folder", "val folder"])
def test_link_out_of_the_image_folder_is_an_error_naming_it(tmp_path, rng, what):
    pytest.importorskip("PIL.Image")
    root = _image_folder(tmp_path / "data", rng)
    outside = _image_folder(tmp_path / "outside", rng)
    link = {"file": root / "train" / "cat" / "evil.png", "class folder": root / "train" / "bird", "val folder": root / "test"}[what]
    target = {"file": outside / "train" / "cat" / "0.png", "class folder": outside / "train" / "dog", "val folder": outside / "val"}[what]
    link.symlink_to(target)
    with pytest.raises(NeqError, match="outside the data folder") as info:
        load_dataset(f"imagefolder:{root}", (16, 16))
    assert str(link) in str(info.value)


def test_link_inside_the_image_folder_is_fine(tmp_path, rng):
    pytest.importorskip("PIL.Image")
    root = _image_folder(tmp_path / "data", rng)
    (root / "val" / "cat" / "2.png").symlink_to(root / "train" / "cat" / "0.png")
    data = load_dataset(f"imagefolder:{root}", (16, 16))
    assert data.test.labels.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(data.test.images[2], data.train.images[0])


@pytest.mark.parametrize("limit", [400, 250])  # 600-pixel images: Pillow warns above the limit, refuses above twice it
def test_decompression_bomb_is_an_error(tmp_path, rng, monkeypatch, limit):
    Image = pytest.importorskip("PIL.Image")
    root = _image_folder(tmp_path / "data", rng)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(NeqError, match="is too large to decode safely"):
        load_dataset(f"imagefolder:{root}", (16, 16))


# 4. npz archives: .npy headers checked before numpy allocates --------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def _npz(path, **members):
    """An archive with x_train, y_train, x_test, y_test (a little valid data set) where `members` replace any of them."""
    arrays = {
        "x_train": np.zeros((6, 4, 4), np.uint8),
        "y_train": np.arange(6) % 2,
        "x_test": np.zeros((2, 4, 4), np.uint8),
        "y_test": np.arange(2),
    }
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in {**arrays, **members}.items():
            archive.writestr(f"{name}.npy", value if isinstance(value, bytes) else _npy(value))
    return path


def _npy_header(shape) -> bytes:
    out = io.BytesIO()
    npy_format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return out.getvalue()


def test_npz_member_declaring_3e12_elements_is_refused(tmp_path):
    path = _npz(tmp_path / "d.npz", x_train=_npy_header((3_000_000, 1000, 1000)) + bytes(100))
    error, peak = _peak(lambda: load_dataset(f"npz:{path}"))
    assert peak < 20 * 2**20, (peak, error)
    assert isinstance(error, NeqError) and "declares shape (3000000, 1000, 1000), more than" in str(error), error


def test_npz_member_declaring_more_bytes_than_it_holds_is_refused_without_allocating(tmp_path):
    path = _npz(tmp_path / "d.npz", x_train=_npy_header((200, 1000, 1000)) + bytes(100))
    error, peak = _peak(lambda: load_dataset(f"npz:{path}"))
    assert peak < 20 * 2**20, (peak, error)
    assert isinstance(error, NeqError) and "(200,000,000 bytes) but the member holds 100" in str(error), error


def test_npz_member_above_the_element_limit_is_refused(tmp_path, monkeypatch):
    path = _npz(tmp_path / "d.npz")
    monkeypatch.setattr(data_module, "MAX_ELEMENTS", 50)
    with pytest.raises(NeqError, match=r"x_train\): declares shape \(6, 4, 4\), more than 50 elements"):
        load_dataset(f"npz:{path}")


def test_npz_object_arrays_stay_refused(tmp_path):
    path = _npz(tmp_path / "d.npz", y_train=np.array([0, 1, 0, 1, 0, 1], object))
    with pytest.raises(NeqError, match="an array of Python objects"):
        load_dataset(f"npz:{path}")


@pytest.mark.parametrize("shape", [(6, 0, 0), (6, 4, 0), (6, 4, 4, 0), (6, 4, 4, 4)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_npz_images_without_height_width_or_channels_are_refused(tmp_path, shape, dtype):
    path = _npz(tmp_path / "d.npz", x_train=np.zeros(shape, dtype))
    with pytest.raises(NeqError, match=r"expected H, W > 0 and 1 or 3 channels"):
        load_dataset(f"npz:{path}")


def test_npz_label_2_40_is_reported_without_allocating(tmp_path):
    path = _npz(tmp_path / "d.npz", y_train=np.array([0, 1, 2**40, 1, 0, 1]))
    error, peak = _peak(lambda: load_dataset(f"npz:{path}"))
    assert peak < 20 * 2**20, (peak, error)
    assert isinstance(error, NeqError) and "train labels run to 1099511627776" in str(error) and "never occur" in str(error), error


def test_npz_accepted_layouts_load(tmp_path, rng):
    for shape, expect in [((6, 4, 5), (4, 5, 1)), ((6, 4, 5, 3), (4, 5, 3)), ((6, 3, 4, 5), (4, 5, 3)), ((6, 1, 4, 5), (4, 5, 1))]:
        x_test = np.zeros((2, *shape[1:]), np.uint8)
        path = _npz(tmp_path / "d.npz", x_train=rng.integers(0, 256, shape, dtype=np.uint8), x_test=x_test)
        data = load_dataset(f"npz:{path}")
        assert data.train.images.shape == (6, *expect) and data.test.images.shape == (2, *expect)
    x = rng.integers(0, 256, (6, 3, 4, 5), dtype=np.uint8)
    np.savez_compressed(tmp_path / "c.npz", x_train=x, y_train=np.arange(6) % 2, x_test=x[:2], y_test=np.arange(2))
    np.testing.assert_array_equal(load_dataset(f"npz:{tmp_path / 'c.npz'}").train.images, x.transpose(0, 2, 3, 1))


# 5. class subsets: only what is written, or an error ------------------------------------------------------


@pytest.mark.parametrize(
    "text,problem",
    [
        ("3,3,3", "class 3 is named more than once"),
        ("0,2,0", "class 0 is named more than once"),
        ("9-5", "the range runs backwards"),
        ("", "neither a range nor a list"),
        (",", "neither a range nor a list"),
        ("-1,2", "a class is never negative"),
        ("0,-2", "a class is never negative"),
        ("-3-5", "a class is never negative"),
        ("5-5", "1 class cannot be trained"),
        ("7", "1 class cannot be trained"),
        ("0-1000000", "spans more than 100,000 classes"),
    ],
)
def test_bad_class_subsets_are_refused(text, problem):
    with pytest.raises(NeqError, match=problem) as info:
        parse_classes(text)
    assert "\n" not in str(info.value) and "5-9" in str(info.value) and "0,2,4" in str(info.value)


def test_class_subsets_through_the_data_spec_and_select_classes():
    assert parse_classes("5-9") == [5, 6, 7, 8, 9] and parse_classes("4,0,2") == [4, 0, 2]
    for spec in ("digits@3,3,3", "digits@9-5", "digits@"):
        with pytest.raises(NeqError, match="classes"):
            load_dataset(spec)
    digits = load_dataset("digits")
    for classes in ([3, 3, 3], [4], []):
        with pytest.raises(NeqError, match="classes"):
            select_classes(digits, classes)
    subset = load_dataset("digits@7,2")
    assert subset.num_classes == 2 and set(subset.train.labels.tolist()) == {0, 1}


# 6. labels: every class in train; test only among train's classes -------------------------------------------


def _split(labels) -> Split:
    return Split(np.zeros((len(labels), 2, 2, 1), np.uint8), np.array(labels, np.int64))


def test_class_with_test_images_but_no_training_images_is_refused():
    with pytest.raises(NeqError, match=r"train labels run to 3 but 1 class below it never occur in the train split \(2\)"):
        check_labels("npz:d.npz", _split([0, 1, 3, 0]), _split([2, 0]))


def test_test_labels_outside_the_train_classes_are_refused():
    with pytest.raises(NeqError, match=r"test labels 3, 4 never occur in the train split \(classes 0..2\)"):
        check_labels("npz:d.npz", _split([0, 1, 2]), _split([0, 3, 4]))


def test_test_split_may_lack_a_class():
    assert check_labels("npz:d.npz", _split([0, 1, 2, 2]), _split([0, 0])) == 3
