"""MODEL specs: built-ins, file.py:factory, run dirs; weights never unpickle arbitrary objects."""

import pickle

import pytest
import torch

from kdcli.infra.errors import UsageError
from kdcli.models.classifiers import build_model, load_run_model, save_run_model


def test_builtin_shapes():
    m, info = build_model("mlp", {"hidden": [16, 8], "dropout": 0.1}, num_classes=3, input_shape=(1, 4, 4))
    assert m(torch.zeros(5, 1, 4, 4)).shape == (5, 3)
    assert info.num_parameters == (16 * 16 + 16) + (16 * 8 + 8) + (8 * 3 + 3)
    c, _ = build_model("cnn", {"channels": [4], "hidden": 8}, num_classes=10, input_shape=(1, 28, 28))
    assert c(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_plugin_with_weights_from_torch_save(tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "def make(num_classes, width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(width, num_classes))\n"
    )
    ref, _ = build_model(f"{tmp_path}/m.py:make", {"width": 6}, num_classes=3, input_shape=(2,))
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    m, info = build_model(
        f"{tmp_path}/m.py:make", {"width": 6}, num_classes=3, input_shape=(2,), weights=str(tmp_path / "w.pt")
    )
    x = torch.randn(4, 2)
    assert torch.equal(m(x), ref(x)) and info.weights_sha256


def test_wrong_output_width_is_named():
    with pytest.raises(UsageError, match="outputs shape .*4.* but the data has 10 classes"):
        build_model(__file__ + ":_four_way", {}, num_classes=10, input_shape=(3,))


def _four_way(**_):
    return torch.nn.Linear(3, 4)


def test_weights_that_do_not_fit_are_named(tmp_path):
    m, _ = build_model("mlp", {"hidden": [4]}, num_classes=2, input_shape=(3,))
    torch.save(m.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UsageError, match="has shape"):
        build_model("mlp", {"hidden": [5]}, num_classes=2, input_shape=(3,), weights=str(tmp_path / "w.pt"))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": _Evil(str(marker))}, f)
    with pytest.raises(UsageError, match="refusing to load"):
        build_model("mlp", {}, num_classes=2, input_shape=(3,), weights=str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_run_dir_round_trip_with_plugin_copy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "net.py").write_text("import torch\ndef make(num_classes):\n    return torch.nn.Linear(3, num_classes)\n")
    m, info = build_model(f"{src}/net.py:make", {}, num_classes=2, input_shape=(3,))
    run = tmp_path / "run"
    run.mkdir()
    save_run_model(run, m, info)
    (src / "net.py").unlink()  # the run dir is self-contained
    m2, info2 = load_run_model(run)
    x = torch.randn(2, 3)
    assert torch.equal(m(x), m2(x)) and info2.num_parameters == 8


def test_a_run_started_from_a_run_keeps_the_recipe(tmp_path):
    """Fine-tuning (train-student --student RUN) saves the model RUN was built from, not a path to RUN."""
    import json

    src = tmp_path / "src"
    src.mkdir()
    (src / "net.py").write_text(
        "import torch\ndef make(num_classes, width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, "
        "num_classes))\n"
    )
    for spec, args in (("mlp", {"hidden": [5]}), (f"{src}/net.py:make", {"width": 6})):
        first, second = tmp_path / "first", tmp_path / "second"
        for d in (first, second):
            d.mkdir(exist_ok=True)
        m, info = build_model(spec, args, num_classes=2, input_shape=(3,))
        save_run_model(first, m, info)
        m1, info1 = build_model(str(first), None, num_classes=2, input_shape=(3,))  # as train-student does
        save_run_model(second, m1, info1)
        meta = json.loads((second / "model.json").read_text())
        assert meta["args"] == args and meta["spec"] == ("mlp" if spec == "mlp" else "model_source.py:make")
        if spec != "mlp":
            assert (second / "model_source.py").read_text() == (src / "net.py").read_text()
        m2, _ = load_run_model(second)
        x = torch.randn(2, 3)
        assert torch.equal(m(x), m2(x))
