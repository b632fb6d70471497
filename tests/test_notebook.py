"""The 2018 notebook's own gating files (search_spaces/notebook/, copied as they stand) and Mayo's format."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gatetune.tuning import config as C
from gatetune.core.errors import UserError
from gatetune.tuning.train.run import train_run
from gatetune.tuning.train.loop import build_model
from gatetune.tuning.data import load as load_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB = os.path.join(ROOT, "search_spaces", "notebook")
SQUEEZE_0115 = os.path.join(NB, "squeezenet_v11_heimdall_2018-01-15.yaml")
FAKE = ["data.dataset=fake", "data.fake_train=32", "data.fake_val=16", "data.image_size=32", "train.epochs=1",
        "train.batch_size=16"]


def test_squeezenet_file_reads_as_the_notebook_meant():
    cfg = C.load(SQUEEZE_0115, FAKE)
    assert cfg.notices and "squeezenet_v11.yaml" in cfg.notices[0] and "built-in" in cfg.notices[0]
    assert cfg.model.name == "squeezenet_v11" and cfg.gating.policy == "mse"     # online: true
    assert cfg.gating.density == 0.9 and cfg.gating.weight == 1e-4
    specs = C.site_specs(cfg)
    gated = {s for s, v in specs.items() if v.gate}
    assert gated == {"conv1", *(f"fire{i}.{e}" for i in range(2, 10) for e in ("expand1", "expand3"))}
    assert not any(v.trainable for v in specs.values())      # every layer it names says trainable: false
    assert all(v.density == 0.9 for s, v in specs.items() if s in gated)


def test_squeezenet_file_trains_one_epoch_with_exactly_its_sites(tmp_path):
    cfg = C.load(SQUEEZE_0115, FAKE)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, torch.device("cpu"), seed=cfg.seed)
    net = build_model(cfg, data)
    assert set(net.gates) == {s for s, v in C.site_specs(cfg).items() if v.gate}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out, m = train_run(cfg, tmp_path / "run", progress=False)
    assert m["epoch"] == 1.0 and not m["diverged"]
    assert {k[len("density/"):] for k in m if k.startswith("density/")} == set(net.gates)
    after = torch.load(next((out / "checkpoints").iterdir()), weights_only=False)["model"]
    frozen = [k for k in after if (".conv.weight" in k or k.endswith("squeeze.weight")) and "predictor" not in k]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)   # trainable: false held
    learned = [k for k in after if "predictor" in k and after[k].is_floating_point()]
    assert learned and any(not torch.equal(after[k], before[k]) for k in learned)   # the predictors train
    assert not torch.equal(after["net.classifier.1.weight"], before["net.classifier.1.weight"])


@pytest.mark.parametrize("name, key, says", [
    ("squeezenet_v11_sigyn_2018-01-14.yaml", "model.layers.fire6.layers.expand1.online", "online: false"),
    ("mobilenet_v1_sigyn_2018-01-14.yaml", "model.layers.conv9.trainbale", "did you mean 'trainable'?"),
    ("squeezenet_v11_heimdall_2018-01-14.yaml", None, "`--` is not a YAML document marker"),
])
def test_notebook_files_that_cannot_run_say_why_in_one_line(name, key, says, tmp_path):
    path = os.path.join(NB, name)
    with pytest.raises(UserError) as e:
        C.load(path)
    assert says in str(e.value) and (key is None or e.value.key == key) and e.value.file.endswith(name)
    r = subprocess.run([sys.executable, "-m", "gatetune.tuning.cli", "train", path, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert says in r.stderr and not (tmp_path / "o").exists()


def _mayo(tmp_path, body: str, name="g.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return str(p)


def test_mobilenet_file_with_the_typo_fixed_gates_conv9_to_13_pointwise(tmp_path):
    text = open(os.path.join(NB, "mobilenet_v1_sigyn_2018-01-14.yaml")).read()
    text = text.replace("trainbale", "trainable").replace("online: false", "online: true")
    cfg = C.load(_mayo(tmp_path, text), FAKE)
    specs = C.site_specs(cfg)
    assert sorted(s for s, v in specs.items() if v.gate) == sorted(f"conv{i}.pointwise" for i in range(9, 14))
    assert sorted(s for s, v in specs.items() if v.trainable) == sorted(f"conv{i}.pointwise" for i in range(9, 14))


def test_mayo_kwargs_per_site_values_and_errors(tmp_path):
    body = """
    model:
        name: squeezenet_v11
        layers:
            _g: &g {type: gated_convolution, density: 0.5, weight: 0.001, online: true}
            _fire: &fire
                kwargs: {should_gate: null, trainable: false, d: 0.5}
                layers:
                    squeeze: {trainable: ^(trainable)}
                    expand3: {<<: *g, should_gate: ^(should_gate), trainable: ^(trainable), density: ^(d)}
            fire8: {<<: *fire, should_gate: true}
            fire9: {<<: *fire, should_gate: true, trainable: true, d: 0.75}
    train: {epochs: 2}
    """
    cfg = C.load(_mayo(tmp_path, body))
    specs = C.site_specs(cfg)
    assert [s for s, v in specs.items() if v.gate] == ["fire8.expand3", "fire9.expand3"]
    assert [s for s, v in specs.items() if v.trainable] == ["fire9.squeeze", "fire9.expand3"]
    assert specs["fire8.expand3"].density == 0.5 and specs["fire9.expand3"].density == 0.75
    assert cfg.train.epochs == 2 and not cfg.notices          # other top-level keys pass through
    for bad, key, says in [
        (body.replace("^(d)}", "^(dd)}"), "expand3.density", "did you mean 'd'?"),
        (body.replace("fire9: {", "fire99: {"), "model.layers.fire99.layers.squeeze", "fire9.squeeze"),
        (body.replace("online: true}", "online: true, densty: 0.5}"), "expand3.densty", "'density'"),
        (body.replace("{trainable: ^(trainable)}", "{trainable: ^(trainable), density: 0.5}"),
         "squeeze.density", "add type: gated_convolution"),
        (body.replace("name: squeezenet_v11", "name: squeezenet"), "model.name", "squeezenet_v11"),
    ]:
        with pytest.raises(UserError, match=says) as e:
            C.load(_mayo(tmp_path, bad, "bad.yaml"))
        assert e.value.key.endswith(key), (e.value.key, key)


def test_missing_import_of_a_gatetune_file_is_still_an_error(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        C.load(_mayo(tmp_path, "_import: nothere.yaml\nmodel: {name: digitnet}\n"))
