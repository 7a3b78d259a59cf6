"""A ``.pt2`` program loads without unpickling anything: an archive whose loading would unpickle (or
run compiled code) is refused before torch reads it, and a plain one comes back exact."""
import io
import json
import logging
import zipfile

import pytest
import torch

from deepshrink.core.errors import ModelLoadError
from deepshrink.models import load
from deepshrink.models.loading import save_checkpoint
from deepshrink.models.zoo import create


class Payload:
    """What a hostile pickle carries: unpickling it calls a function of the file's choosing."""

    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.fixture
def unpickling(monkeypatch):
    """The ``weights_only`` of every ``torch.load`` torch's loader makes."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.fixture
def program(tmp_path):
    torch.manual_seed(0)
    model = create("lenet-5").eval()
    return model, save_checkpoint(model, tmp_path / "m.pt2", example_input=torch.randn(2, 1, 28, 28))


def rewritten(path, out, *, replace=None, add=None):
    """A copy of the archive at ``path`` with files (named under its root folder) replaced or added."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        root = source.namelist()[0].split("/")[0]
        for name in source.namelist():
            inner = name[len(root) + 1:]
            data = source.read(name)
            target.writestr(name, replace[inner](data) if inner in replace else data)
        for inner, data in add.items():
            target.writestr(f"{root}/{inner}", data)
    return out


def pickled_weight(config: bytes) -> bytes:
    document = json.loads(config)
    first = next(iter(document["config"]))
    document["config"][first]["use_pickle"] = True
    return json.dumps(document).encode()


def custom_object(config: bytes) -> bytes:
    document = json.loads(config)
    document["config"]["obj"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": None}
    return json.dumps(document).encode()


def hostile_sample_inputs(_: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save(((Payload(),), {}), buffer)
    return buffer.getvalue()


def test_a_program_comes_back_exact_at_any_batch_size_without_unpickling(program, unpickling):
    model, path = program
    again = load(path)
    for n in (1, 5):
        x = torch.randn(n, 1, 28, 28)
        assert torch.equal(again(x), model(x))
    assert unpickling and all(weights_only is True for weights_only in unpickling)


@pytest.mark.parametrize("tamper, why", [
    (lambda p, o: rewritten(p, o, replace={"data/weights/model_weights_config.json": pickled_weight}), "stored pickled"),
    (lambda p, o: rewritten(p, o, replace={"data/constants/model_constants_config.json": custom_object}), "stored pickled"),
    (lambda p, o: rewritten(p, o, replace={"data/sample_inputs/model.pt": hostile_sample_inputs}), "sample inputs"),
    (lambda p, o: rewritten(p, o, add={"data/aotinductor/model/model.so": b"\x7fELF"}), "data/aotinductor/model/model.so"),
    (lambda p, o: rewritten(p, o, add={"data/weights/model.pt": b""}), "data/weights/model.pt"),
    (lambda p, o: rewritten(p, o, add={"data/constants/custom_obj_0": b""}), "data/constants/custom_obj_0"),
], ids=["pickled-weight", "custom-object", "hostile-sample-inputs", "compiled-code", "legacy-weights", "custom-object-file"])
def test_an_archive_whose_loading_would_unpickle_is_refused_before_torch_reads_it(program, tmp_path, unpickling, tamper, why):
    path = tamper(program[1], tmp_path / "tampered.pt2")
    with pytest.raises(ModelLoadError, match=rf"tampered\.pt2 is not a loadable torch\.export program: .*{why}.*save_checkpoint"):
        load(path)
    assert False not in unpickling


def test_torch_alone_would_unpickle_the_hostile_sample_inputs(program, tmp_path, unpickling, capsys):
    """Why the check exists: torch.export.load falls back to the unrestricted unpickler."""
    path = rewritten(program[1], tmp_path / "tampered.pt2", replace={"data/sample_inputs/model.pt": hostile_sample_inputs})
    # torch's own fallback warning has one argument for two %s: a log handler that formats it raises
    logging.getLogger("torch._export.serde.serialize").setLevel(logging.ERROR)
    try:
        torch.export.load(path)
    finally:
        logging.getLogger("torch._export.serde.serialize").setLevel(logging.NOTSET)
    assert unpickling == [True, False] and "unpickled" in capsys.readouterr().out


def test_an_operator_nothing_defines_is_named(program, tmp_path):
    def unknown_op(text: bytes) -> bytes:
        return text.replace(b"torch.ops.aten.relu.default", b"torch.ops.nowhere_lib.relu.default")

    path = rewritten(program[1], tmp_path / "op.pt2", replace={"models/model.json": unknown_op})
    with pytest.raises(ModelLoadError, match=r"op\.pt2 calls torch\.ops\.nowhere_lib\.relu, which no loaded library defines"):
        load(path)
