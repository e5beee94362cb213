"""DATA specs: npz, HDF5, plugins, slices, MNIST; row hashes and fingerprints."""

import h5py
import numpy as np
import pytest
from conftest import make_blobs

from kdcli.data import fingerprint, load_data, row_hashes
from kdcli.infra.errors import UsageError


def test_npz_and_h5_give_the_same_rows(tmp_path):
    x, y = make_blobs(50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"], f["y"] = x, y
    a, b = load_data(str(tmp_path / "d.npz")), load_data(str(tmp_path / "d.h5"))
    assert a.n == b.n == 50 and a.num_classes == 4 and a.input_shape == (8,)
    np.testing.assert_array_equal(a.row_hash, b.row_hash)
    assert a.fingerprint == b.fingerprint


def test_plugin_dataset(tmp_path):
    (tmp_path / "ds.py").write_text(
        "import torch\n"
        "class D(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 10\n"
        "    def __getitem__(self, i): return torch.full((3,), float(i)), i % 2\n"
        "def make(): return D()\n"
    )
    d = load_data(f"{tmp_path / 'ds.py'}:make")
    assert d.n == 10 and d.num_classes == 2 and d.x[7].tolist() == [7.0, 7.0, 7.0]


def test_slices_are_part_of_identity(tmp_path):
    x, y = make_blobs(50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    whole, part = load_data(str(tmp_path / "d.npz")), load_data(f"{tmp_path / 'd.npz'}[10:20]")
    assert part.n == 10
    np.testing.assert_array_equal(part.row_hash, whole.row_hash[10:20])
    assert part.fingerprint != whole.fingerprint and part.identity()["spec"].endswith("[10:20]")


def test_row_hash_sees_every_change():
    x, y = make_blobs(20)
    h = row_hashes(x, y)
    assert len(set(h.tolist())) == 20
    x2 = x.copy()
    x2[3, 0] = np.nextafter(x2[3, 0], np.float32(np.inf))  # one ulp on one pixel
    y2 = y.copy()
    y2[5] = (y2[5] + 1) % 4
    assert (row_hashes(x2, y) != h).tolist() == [i == 3 for i in range(20)]
    assert (row_hashes(x, y2) != h).tolist() == [i == 5 for i in range(20)]
    assert fingerprint(h[::-1]) != fingerprint(h)  # order matters


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.array([0, 1, -1])), "labels must be >= 0"),
        (lambda p: np.savez(p, x=np.zeros((3, 2)), y=np.array([0, 1])), "one label per row"),
        (lambda p: np.savez(p, x=np.zeros((0, 2)), y=np.zeros(0, int)), "empty"),
        (lambda p: np.savez(p, x=np.full((2, 2), np.nan), y=np.array([0, 1])), "NaN"),
        (lambda p: np.savez(p, x=np.zeros((2, 2)), y=np.array([0.5, 1.0])), "integers"),
        (lambda p: np.savez(p, inputs=np.zeros((2, 2)), y=np.array([0, 1])), "no array 'x'"),
    ],
)
def test_bad_data_is_a_usage_error(tmp_path, make, match):
    p = tmp_path / "bad.npz"
    make(p)
    with pytest.raises(UsageError, match=match):
        load_data(str(p))


def test_unknown_spec_and_missing_file():
    with pytest.raises(UsageError, match="unrecognised DATA spec"):
        load_data("imagenet:train")
    with pytest.raises(UsageError, match="not found"):
        load_data("/nonexistent/d.npz")


def test_mnist_real_rows():
    pytest.importorskip("mnist")
    d = load_data("mnist:test[:100]")
    assert d.n == 100 and d.input_shape == (1, 28, 28) and d.num_classes == 10
    assert 0.0 <= float(d.x.min()) and float(d.x.max()) < 1.0
    assert d.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first MNIST test labels
