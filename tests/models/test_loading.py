import pytest
import torch

from deepshrink.core.errors import ModelLoadError
from deepshrink.models import create, load, save_checkpoint


@pytest.mark.parametrize("name, params", [("lenet-5", 431_080), ("lenet-300-100", 266_610), ("seed-mlp", 203_530)])
def test_zoo_parameter_counts(name, params):
    model = create(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_unknown_model():
    with pytest.raises(ModelLoadError, match="unknown model 'resnet'; choose one of lenet-300-100, seed-mlp, lenet-5"):
        create("resnet")
    with pytest.raises(ModelLoadError, match="is not a zoo model"):
        load("resnet")


def test_a_safetensors_file_not_written_by_deepshrink_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file(create("lenet-5").state_dict(), str(path))                # weights, but no architecture record
    with pytest.raises(ModelLoadError, match="no 'deepshrink' metadata; save it with deepshrink.models.save_checkpoint"):
        load(path)


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = create("lenet-5")
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


USER_MODEL = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.fc = nn.Linear(784, width)
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x.flatten(1))))
'''


def test_user_model_file_and_its_checkpoint(tmp_path):
    (tmp_path / "mine.py").write_text(USER_MODEL)
    model = load(f"{tmp_path / 'mine.py'}:Tiny", width=8)
    assert model.fc.out_features == 8
    path = save_checkpoint(model, tmp_path / "mine.safetensors")
    again = load(path, code=f"{tmp_path / 'mine.py'}:Tiny")          # the loader names the code it runs
    assert torch.equal(again.fc.weight, model.fc.weight) and again.fc.out_features == 8


def test_a_checkpoint_never_runs_the_code_it_names(tmp_path):
    """A checkpoint whose arch names a .py file: loading it without naming that code imports nothing."""
    marker = tmp_path / "ran.txt"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + USER_MODEL)
    model = load(f"{tmp_path / 'evil.py'}:Tiny")
    marker.unlink()
    path = save_checkpoint(model, tmp_path / "evil.safetensors")
    with pytest.raises(ModelLoadError, match=r"was built by your code 'Tiny' from evil.py; rebuilding it runs that code, "
                                              r"so name the file yourself: code='path/to/evil.py:Tiny'"):
        load(path)
    assert not marker.exists()
    with pytest.raises(ModelLoadError, match="was built by 'Tiny' from evil.py, but the code named is"):
        load(path, code=f"{tmp_path / 'evil.py'}:Other")
    from deepshrink.cli import main

    assert main(["evaluate", str(path), "--data", "digits", "--runs", "1", "--warmup", "0"]) == 2
    assert not marker.exists()


def test_user_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(f"{tmp_path / 'absent.py'}:Tiny")
    (tmp_path / "bad.py").write_text("raise ImportError('boom')\n")
    with pytest.raises(ModelLoadError, match="importing .*bad.py failed: ImportError: boom"):
        load(f"{tmp_path / 'bad.py'}:Tiny")
    (tmp_path / "mine.py").write_text(USER_MODEL)
    with pytest.raises(ModelLoadError, match="mine.py defines no 'Nope'"):
        load(f"{tmp_path / 'mine.py'}:Nope")
    (tmp_path / "loaders.py").write_text(
        "import sys\nfrom torch import nn\nVALUE = 3\n"
        "def pretrained(width=4):\n    return nn.Linear(2, width)\n"
        "def wrong():\n    return 'weights.bin'\n"
        "def leaves():\n    sys.exit(3)\n")
    model = load(f"{tmp_path / 'loaders.py'}:pretrained", width=5)        # a loader function, not only a class
    assert isinstance(model, torch.nn.Linear) and model.out_features == 5
    with pytest.raises(ModelLoadError, match=r"wrong\(\*\*\{\}\) in .*loaders.py returned a str, not an nn.Module"):
        load(f"{tmp_path / 'loaders.py'}:wrong")
    with pytest.raises(ModelLoadError, match="'VALUE' in .*loaders.py is a int, not an nn.Module class"):
        load(f"{tmp_path / 'loaders.py'}:VALUE")
    with pytest.raises(ModelLoadError, match=r"leaves\(\*\*\{\}\) failed: SystemExit: 3"):   # sys.exit is reported, not obeyed
        load(f"{tmp_path / 'loaders.py'}:leaves")


def test_pickles_are_refused_and_garbage_is_reported(tmp_path):
    torch.save(create("seed-mlp").state_dict(), tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match=r"\.pt checkpoints are not loaded \(pickle runs code\)"):
        load(tmp_path / "m.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelLoadError, match="not a readable safetensors checkpoint"):
        load(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt2").write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="not a loadable torch.export program"):
        load(tmp_path / "junk.pt2")


def test_sparse_dsk_round_trip_is_exact_and_small(tmp_path):
    model = create("lenet-300-100")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p[torch.rand_like(p) < 0.9] = 0
    path = save_checkpoint(model, tmp_path / "m.dsk")
    loaded = load(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    # 90 % zeros stored as positions + fp32 values: well under half the dense fp32 bytes
    assert path.stat().st_size < 0.25 * 4 * 266_610


def test_a_plain_module_is_stored_with_its_loader_not_a_pickle(tmp_path):
    """A module the user built in their own code: record how to rebuild it, then .safetensors and
    .dsk work, and loading names the code again."""
    from deepshrink.formats.container import read_container
    from deepshrink.models import record_loader

    (tmp_path / "mine.py").write_text(USER_MODEL)
    from importlib import util

    spec = util.spec_from_file_location("mine_for_test", tmp_path / "mine.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Tiny(width=6)                       # built by the user, not by deepshrink
    with pytest.raises(ModelLoadError, match=r"record_loader\(model, 'path/to/file.py:NAME'"):
        save_checkpoint(model, tmp_path / "m.dsk")
    record_loader(model, f"{tmp_path / 'mine.py'}:Tiny", width=6)
    path = save_checkpoint(model, tmp_path / "m.dsk")
    _, meta = read_container(path)
    assert meta["arch"]["class"] == "Tiny" and meta["arch"]["kwargs"] == {"width": 6}
    again = load(path, code=f"{tmp_path / 'mine.py'}:Tiny")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), model(x))
