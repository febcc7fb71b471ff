"""Reading a CIFAR-10 python batch without running anything from it. The batches are pickles, and
unpickling calls whatever global a file names; a crafted batch would run a shell command the moment a
data set is opened. This unpickler resolves only the globals the real files use."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np


def _numpy_global(module: str, name: str) -> object:
    """numpy 2 moved numpy.core to numpy._core (the old name warns); the real CIFAR files, written under
    numpy 1, name the old one, files written under numpy 2 the new one."""
    try:
        return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
    except ImportError:  # numpy 1
        return getattr(importlib.import_module(module.replace("numpy._core", "numpy.core")), name)


# What the CIFAR python batches reference: the numpy array reconstruction (pickle protocol 2, as the real
# files; 4; and 5's buffer form), and bytes as Python 3 writes them at protocol 2. Nothing that runs code.
CIFAR_PICKLE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class RefusedPickle(pickle.UnpicklingError):
    """A pickle that names a global outside CIFAR_PICKLE_GLOBALS."""


class _CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only CIFAR_PICKLE_GLOBALS: containers, bytes, str, numbers and numpy
    arrays load; any other class or function (what a crafted file would call) is refused, never imported."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise RefusedPickle(f"it names {module}.{name}, which a CIFAR-10 batch never holds")
        if module == "_codecs":
            return super().find_class(module, name)
        return _numpy_global(module, name)


def read_cifar_batch(path: Path) -> dict:
    """One CIFAR-10 python batch, read without running anything from the file: {b"data", b"labels", ...}."""
    with open(path, "rb") as f:
        batch = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"holds a {type(batch).__name__}; expected a dict")
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "ui":
        raise ValueError("its data is not an integer array")
    return batch
