"""CIFAR's python batches, read without pickle.load: a crafted batch cannot run anything.

A batch (cifar-10-batches-py/data_batch_1, cifar-100-python/train) is a pickled dict of bytes keys:
b"data" a uint8 N x 3072 ndarray, b"labels" / b"fine_labels" a list of ints. The unpickler here
resolves only the globals such a file names (numpy's array reconstruction, dtype, and the helpers
Python 3 writes for bytes in protocol 2), each to a stand-in that allocates nothing the bytes do not
hold; any other global is one NeqError. Before unpickling, the opcodes are scanned without running
them, since the C unpickler allocates for a declared length or memo index before it reads.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from pathlib import Path

import numpy as np

from onnx_neq.errors import NeqError

MAX_ARRAY_VALUES = 2**31  # values in one array (the limit data.py applies to every array it reads)


def unpickle_batch(path: Path, raw: bytes) -> object:
    """The object pickled in `raw` (a CIFAR batch), its arrays as numpy arrays of at most MAX_ARRAY_VALUES
    values; NeqError (or ValueError from a stand-in) for anything a CIFAR batch does not hold."""
    _scan_pickle(path, raw)
    batch = _CifarUnpickler(path, raw).load()
    if isinstance(batch, dict):
        return {k: v.array if isinstance(v, _Array) else v for k, v in batch.items()}
    return batch


class _NdarrayName:
    """What `numpy.ndarray` unpickles to: a name for `_reconstruct` to check, never the (allocating) class itself."""

    __slots__ = ()  # a BUILD opcode cannot set attributes on it


_NDARRAY = _NdarrayName()
_DTYPE_NAMES = {"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"}


class _Dtype:
    """A numeric numpy dtype as `numpy.dtype(name, align, copy)` unpickles; its state may only set the byte order."""

    def __init__(self, name, align=False, copy=True):
        name = name.decode("ascii") if isinstance(name, bytes) else name
        if name not in _DTYPE_NAMES:
            raise ValueError(f"dtype {name!r} is not a plain number type")
        self.dtype = np.dtype(name)

    def __setstate__(self, state) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        order = order.decode("ascii") if isinstance(order, bytes) else order
        if order not in ("|", "=", "<", ">") or any(v is not None for v in state[2:5]):
            raise ValueError("a dtype state other than a byte order")
        self.dtype = self.dtype.newbyteorder(order) if order in "<>" else self.dtype


class _Array:
    """An ndarray being unpickled: `_reconstruct` makes it empty, its state (shape, dtype, order, bytes) fills it."""

    def __init__(self, array: np.ndarray | None = None):
        self.array = array

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("an ndarray state other than (version, shape, dtype, fortran, bytes)")
        shape, dtype, fortran, raw = state[-4:]
        self.array = _array_from(raw, dtype, shape, "F" if fortran else "C")


def _array_from(raw, dtype, shape, order) -> np.ndarray:
    """The array `raw` holds, when its length is exactly what the shape and dtype declare."""
    if not isinstance(dtype, _Dtype) or not isinstance(raw, (bytes, bytearray)) or order not in ("C", "F"):
        raise ValueError("an ndarray of something other than bytes of a plain number type")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"an ndarray shape {shape!r}")
    count = math.prod(shape)
    if count > MAX_ARRAY_VALUES or count * dtype.dtype.itemsize != len(raw):
        raise ValueError(f"an ndarray of shape {shape} stored in {len(raw):,} bytes")
    return np.frombuffer(raw, dtype.dtype).reshape(shape, order=order)


def _reconstruct(subtype, shape, dtype) -> _Array:
    if subtype is not _NDARRAY:
        raise ValueError("_reconstruct of something other than numpy.ndarray")
    return _Array()


def _frombuffer(buffer, dtype, shape, order) -> _Array:
    """numpy's protocol-5 form: the bytes, then how to view them."""
    return _Array(_array_from(buffer, dtype, shape, order))


def _latin1(text, encoding) -> bytes:
    """`_codecs.encode(text, 'latin1')`: how Python 3 writes bytes in a protocol-2 pickle."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("_codecs.encode other than of a str to latin1")
    return text.encode("latin-1")


def _empty_bytes(*args) -> bytes:
    """`bytes()`: how Python 3 writes b'' in a protocol-2 pickle (bytes(n) would allocate n bytes)."""
    if args:
        raise ValueError("bytes() with arguments")
    return b""


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _latin1,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}
_REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER"}


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds only what a CIFAR python batch holds: dicts, lists, bytes, ints and plain numeric arrays."""

    def __init__(self, path: Path, raw: bytes):
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise NeqError(f"{self.path} is not a CIFAR python batch: it refers to {module}.{name}, which onnx-neq never loads")
        return _PICKLE_GLOBALS[(module, name)]


def _scan_pickle(path: Path, raw: bytes) -> None:
    """Walk the opcodes without running them: every declared length must be present and memo slots stay below the opcode
    count, since the C unpickler allocates for a declared length (or memo index) before reading."""
    for count, (op, arg, pos) in enumerate(pickletools.genops(raw), 1):
        if op.name in _REFUSED_OPCODES:
            raise NeqError(f"{path} is not a CIFAR python batch: it uses the pickle opcode {op.name}, which onnx-neq never loads")
        if (op.name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > count) or (op.name == "FRAME" and arg > len(raw) - pos):
            raise NeqError(f"{path} is not a CIFAR python batch: it declares {op.name} {arg:,} in a pickle of {len(raw):,} bytes")
