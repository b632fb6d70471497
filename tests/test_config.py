"""Config loading: _import inheritance, dotted overrides, and one-line errors for every bad input."""
import pytest

from gatetune.tuning import config as C
from gatetune.core.errors import UserError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_import_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "model: {name: digitnet}\ngating: {density: 0.5, weight: 1.0e-6}\ntrain: {epochs: 4}\n")
    child = write(tmp_path, "child.yaml", "_import: base.yaml\ngating: {density: 0.25}\n")
    cfg = C.load(child, ["train.epochs=3", "gating.gate=[conv1, conv2]"])
    assert cfg.gating.density == 0.25          # child overrides parent
    assert cfg.gating.weight == 1e-6           # parent kept where child is silent
    assert cfg.train.epochs == 3               # override parsed as YAML int
    assert cfg.gating.gate == ["conv1", "conv2"]
    assert cfg.name == "child"


def test_import_replaces_space_distributions_whole(tmp_path):
    write(tmp_path, "base.yaml", "search: {}\nspace: {gating.density: {choice: [0.5]}, gating.weight: {loguniform: [1.0e-8, 1.0e-6]}}\n")
    child = write(tmp_path, "child.yaml", "_import: base.yaml\nspace: {gating.density: {grid: [0.25, 1.0]}}\n")
    cfg = C.load(child)
    assert cfg.space == {"gating.density": {"grid": [0.25, 1.0]}, "gating.weight": {"loguniform": [1e-8, 1e-6]}}


def test_site_specs_from_patterns(tmp_path):
    p = write(tmp_path, "c.yaml", "gating: {gate: [conv1, conv2], trainable: none, density: 0.5, "
                                  "sites: {conv2: {density: 0.25}}}\n")
    specs = C.site_specs(C.load(p))
    assert specs["conv1"].gate and specs["conv1"].density == 0.5 and not specs["conv1"].trainable
    assert specs["conv2"].density == 0.25
    assert not specs["conv3"].gate


@pytest.mark.parametrize("text, overrides, key, words", [
    ("gating: {trainbale: all}\n", [], "gating.trainbale", ["unknown key", "did you mean 'trainable'"]),
    ("gating: {density: 1.5}\n", [], "gating.density", ["must be <= 1", "1.5"]),
    ("gating: {density: 0}\n", [], "gating.density", ["must be > 0"]),
    ("gating: {weight: -1.0}\n", [], "gating.weight", ["must be >= 0"]),
    ("train: {epochs: three}\n", [], "train.epochs", ["must be an integer", "'three'"]),
    ("gating: {policy: fsb}\n", [], "gating.policy", ["did you mean 'fbs'"]),
    ("model: {name: resnet21}\n", [], "model.name", ["unknown model", "resnet20"]),
    ("gating: {gate: [conv7]}\n", [], "gating.gate", ["conv7"]),
    ("data: {dataset: cifar10, root: /nonexistent/cifar}\n", [], "data.root", ["/nonexistent/cifar"]),
    ("model: {weights: /nonexistent/w.pt}\n", [], "model.weights", ["not found"]),
    ("{}\n", ["gating.density=2"], "gating.density", ["command line override"]),
])
def test_bad_values_one_line(tmp_path, text, overrides, key, words):
    p = write(tmp_path, "bad.yaml", text)
    with pytest.raises(UserError) as e:
        C.load(p, overrides)
    msg = str(e.value)
    assert "\n" not in msg and e.value.key == key and key in msg
    if not overrides:
        assert str(p) in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("text, words", [
    ("", ["empty"]),
    ("model: [\n", ["YAML syntax error", "line"]),
    ("- a\n- b\n", ["mapping"]),
])
def test_bad_files(tmp_path, text, words):
    p = write(tmp_path, "bad.yaml", text)
    with pytest.raises(UserError) as e:
        C.load(p)
    assert str(p) in str(e.value) and all(w in str(e.value) for w in words)


def test_binary_file_and_missing_file_and_cycle(tmp_path):
    b = tmp_path / "bin.yaml"
    b.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="not a text file"):
        C.load(b)
    with pytest.raises(UserError, match="file not found"):
        C.load(tmp_path / "missing.yaml")
    write(tmp_path, "a.yaml", "_import: b.yaml\n")
    write(tmp_path, "b.yaml", "_import: a.yaml\n")
    with pytest.raises(UserError, match="_import cycle"):
        C.load(tmp_path / "a.yaml")


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "train..epochs=3", "gating.gate=[a, b"])
def test_malformed_override(tmp_path, bad):
    p = write(tmp_path, "ok.yaml", "{}\n")
    with pytest.raises(UserError, match="override"):
        C.load(p, [bad])


def test_config_keys_and_with_params():
    keys = C.config_keys()
    assert "gating.density" in keys and "train.optimizer.lr" in keys and "train.lr_schedule.decay_epochs" in keys
    cfg = C.with_params(C.to_dict(C.Config()), {"gating.density": 0.25, "train.optimizer.lr": 0.1})
    assert cfg.gating.density == 0.25 and cfg.train.optimizer.lr == 0.1
