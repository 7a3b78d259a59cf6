"""``Runner.call_for``: the call latency times runs the runtime alone, and computes what ``predict`` does."""
import pytest
import torch

from deepshrink.core.timing import steady_block, time_calls, torch_threads
from deepshrink.deploy import export
from deepshrink.evaluation.runners import open_runner
from deepshrink.models import create


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.manual_seed(0)
    model = create("seed-mlp").eval()
    out = tmp_path_factory.mktemp("call_for")
    x = torch.rand(4, 1, 28, 28)
    paths = {"static.onnx": dict(static_batch=True), "dynamic.onnx": {}, "static.pte": dict(static_batch=True), "dynamic.pte": {}}
    for name, kw in paths.items():
        export(model, out / name, example_input=x, **kw)
    return model, out, x


@pytest.mark.parametrize("name", ["eager", "static.onnx", "dynamic.onnx", "static.pte", "dynamic.pte"])
def test_the_timed_call_computes_what_predict_computes(files, name):
    model, out, x = files
    runner = open_runner(model if name == "eager" else out / name)
    x1 = x[:1]
    call = runner.call_for(x1)
    expected = runner.predict(x1)
    for _ in range(3):   # repeated calls reuse the bound buffers and stay right
        result = call()
        first = result[0] if isinstance(result, (list, tuple)) else result
        assert torch.equal(torch.as_tensor(first), expected)


@pytest.mark.parametrize("name", ["static.onnx", "static.pte"])
def test_a_static_batch_file_timed_on_another_batch_falls_back_to_chunks(files, name):
    _, out, x = files
    runner = open_runner(out / name)   # batch 1 per call: a batch of 4 runs as 4 calls
    assert torch.equal(torch.as_tensor(runner.call_for(x)()[0]), runner.predict(x))


def test_time_calls_interleaves_and_counts():
    order = []
    times = time_calls([lambda: order.append("a"), lambda: order.append("b")], runs=3, warmup=1)
    assert order == ["a", "b"] * 4   # one warm-up each, then a b a b a b
    assert [len(t) for t in times] == [3, 3] and all(v >= 0 for t in times for v in t)


def test_time_calls_in_rounds_of_a_block_counts_every_call_once():
    order = []
    times = time_calls([lambda: order.append("a"), lambda: order.append("b")], runs=5, warmup=1, block=2)
    # one warm-up each, then rounds of 2 a and 2 b; the last round holds what is left (1 each)
    assert "".join(order) == "ab" + "aabb" + "aabb" + "ab"
    assert [len(t) for t in times] == [5, 5]
    with pytest.raises(ValueError, match="block must be at least 1"):
        time_calls([lambda: None], runs=1, warmup=0, block=0)


def test_comparisons_time_each_file_in_ten_rounds():
    assert [steady_block(r) for r in (200, 30, 9, 0)] == [20, 3, 1, 1]
    order = []
    time_calls([lambda: order.append("a"), lambda: order.append("b")], runs=30, warmup=0, block=steady_block(30))
    assert "".join(order) == "aaabbb" * 10


def test_torch_threads_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_call_outlives_its_runner(files):
    """The call keeps the program alive: a .pte method run after its program was freed crashes the process."""
    import gc

    _, out, x = files
    call = open_runner(out / "static.pte").call_for(x[:1])
    gc.collect()
    assert torch.equal(call()[0], open_runner(out / "static.pte").predict(x[:1]))
