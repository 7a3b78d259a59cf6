"""The README's Python example, run as written from a directory outside the checkout, on 1,000
training images (its TRAIN_IMAGES knob), with MNIST found where the example says: ~/data/mnist."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_starts_with_the_two_setup_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    commands = [line.split("#")[0].strip() for line in lines[:12] if line.startswith("make ")]
    assert commands == ["make demo", "make test"]


def test_readme_example_runs_from_anywhere(shared_data, tmp_path, monkeypatch, capsys):
    code = python_example()
    assert "../" not in code and "shared" not in code       # no path into the checkout or its neighbours
    code, knobs = re.subn(r"^TRAIN_IMAGES = [\d_]+", "TRAIN_IMAGES = 1_000", code, flags=re.M)
    assert knobs == 1, "the README example lost its TRAIN_IMAGES knob"
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "mnist").symlink_to(shared_data / "mnist")
    monkeypatch.setenv("HOME", str(home))                     # Path.home(): where the example looks
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert len(namespace["data"].train) == 1_000
    assert (work / "out" / "lenet5.pte").stat().st_size < 0.3 * 4 * 431_080   # int8, written under the cwd
    figures = {k: float(v) for k, v in re.findall(r"\b(accuracy|params|nonzero_params|macs)=([\d.]+)", printed)}
    assert figures["params"] == 431_080 and figures["macs"] == 2_293_000
    # 90 % of conv2 + fc1 (425,000; the first conv and the classifier are skipped) pruned; int8 rounds a few more to 0
    assert 45_000 < figures["nonzero_params"] <= 431_080 - 0.9 * 425_000
    assert figures["accuracy"] > 0.85                                       # 1,000 images, 5 + 2 epochs
