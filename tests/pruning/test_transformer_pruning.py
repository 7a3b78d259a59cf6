"""TransformerPruning: heads and FFN neurons removed, the model exactly its masked self, smaller, exportable."""
from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml

from deepshrink.core import samples as S
from deepshrink.core.config import from_dict, to_dict
from deepshrink.core.errors import ConfigError
from deepshrink.core.graph import capture
from deepshrink.core.outputs import primary
from deepshrink.data.splits import from_samples
from deepshrink.pruning import TransformerPruning, TransformerReport, prune, prune_report
from deepshrink.pruning.structured import (PrunedMultiheadAttention, block_sensitivity, find_blocks, mask_units, output_change,
                                           prune_transformer)

_SPEC = importlib.util.spec_from_file_location("tiny_transformer", Path(__file__).parents[1] / "fixtures" / "tiny_transformer.py")
tt = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tt)

X = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
PADDING = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])


def _proj():
    torch.manual_seed(0)
    return tt.TinyProj().eval()


def _torch_encoder():
    torch.manual_seed(0)
    return tt.TinyTorchEncoder().eval()


# model, example input, parameters one head removes, parameters one FFN neuron removes (hidden 32, heads of 8)
MODELS = {
    "hf-bert": (tt.tiny_bert, tt.token_batch(), 3 * (8 * 32 + 8) + 8 * 32, 32 + 1 + 32),
    "q_proj-gated": (_proj, X, 4 * 8 * 32, 3 * 32),
    "nn.TransformerEncoderLayer": (_torch_encoder, (X, PADDING), 3 * (8 * 32 + 8) + 8 * 32, 32 + 1 + 32),
}


def _out(model, x):
    with torch.no_grad():
        return primary(S.call(model, x))


def _masked_reference(model, report: TransformerReport):
    reference = copy.deepcopy(model)
    for block in find_blocks(reference):
        mask_units(reference, block, report.removed.get(block.name, []))
    return reference


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_blocks_are_found_in_each_convention():
    found = {key: [(b.name, b.kind, b.convention, b.units, b.unit_size) for b in find_blocks(build())]
             for key, (build, *_) in MODELS.items()}
    assert found["hf-bert"][:2] == [("encoder.layer.0", "neurons", "ffn", 64, 1),
                                    ("encoder.layer.0.attention.self", "heads", "projections", 4, 8)]
    assert find_blocks(tt.tiny_bert())[1].roles["output"] == "encoder.layer.0.attention.output.dense"
    assert found["q_proj-gated"][:2] == [("layers.0.self_attn", "heads", "projections", 4, 8),
                                         ("layers.0.mlp", "neurons", "ffn", 64, 1)]
    assert find_blocks(_proj())[1].roles == {"up": "layers.0.mlp.up_proj", "down": "layers.0.mlp.down_proj",
                                             "gate": "layers.0.mlp.gate_proj"}
    assert found["nn.TransformerEncoderLayer"][:2] == [("layers.0", "neurons", "ffn", 64, 1),
                                                       ("layers.0.self_attn", "heads", "mha", 4, 8)]
    assert all(len(f) == 4 for f in found.values())


@pytest.mark.parametrize("key, importance", [(key, importance) for key in MODELS for importance in ("l1", "taylor")]
                         + [("hf-bert", "l2")])
def test_shrunk_model_equals_its_masked_reference_and_has_the_expected_size(key, importance):
    build, x, per_head, per_neuron = MODELS[key]
    model = build()
    before = _params(model)
    prune(model, TransformerPruning(heads=1, ffn=0.25, importance=importance, block_sensitivity=False, batches=2), example_input=x)
    report = prune_report(model)
    assert set(report.heads.values()) == {(4, 3)} and len(report.heads) == 2
    assert set(report.neurons.values()) == {(64, 48)} and len(report.neurons) == 2
    assert all(len(report.removed[n]) == 1 for n in report.heads) and all(len(report.removed[n]) == 16 for n in report.neurons)
    assert (report.params_before, report.params_after) == (before, before - 2 * (per_head + 16 * per_neuron)) == (before, _params(model))
    reference = _masked_reference(build(), report)
    assert float((_out(model, x) - _out(reference, x)).abs().max()) < 1e-5
    assert report.fidelity == pytest.approx(output_change(_out(build(), x), _out(model, x)))


def test_hf_attributes_and_layer_widths_follow_the_heads():
    model = tt.tiny_bert()
    prune(model, TransformerPruning(heads=2, ffn=0.5), example_input=tt.token_batch())
    attention = model.encoder.layer[0].attention
    assert (attention.self.num_attention_heads, attention.self.attention_head_size, attention.self.all_head_size) == (2, 8, 16)
    assert [attention.self.query.out_features, attention.self.key.out_features, attention.self.value.out_features,
            attention.output.dense.in_features] == [16, 16, 16, 16]
    assert (model.encoder.layer[0].intermediate.dense.out_features, model.encoder.layer[0].output.dense.in_features) == (32, 32)
    assert attention.output.dense.out_features == 32   # the residual width never changes


def test_multihead_attention_is_replaced_and_still_matches_with_weights_and_a_3d_mask():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(16, 4)}).eval()
    q, mask = torch.randn(5, 2, 16), torch.randn(2 * 4, 5, 5)

    def run(m):
        with torch.no_grad():
            return m["attn"](q, q, q, attn_mask=mask, need_weights=True, average_attn_weights=False)

    original = copy.deepcopy(model)
    report = prune_transformer(model, TransformerPruning(heads=1, ffn=0.0), example_input=None)
    assert isinstance(model["attn"], PrunedMultiheadAttention) and model["attn"].num_heads == 3
    (out, weights), (ref_out, ref_weights) = run(model), run(_masked_reference(original, report))
    kept = [h for h in range(4) if h not in report.removed["attn"]]
    assert model["attn"].kept_heads == tuple(kept)
    assert float((out - ref_out).abs().max()) < 1e-5 and float((weights - ref_weights[:, kept]).abs().max()) < 1e-5


def test_pruning_twice_composes():
    model = _torch_encoder()
    config = TransformerPruning(heads=1, ffn=0.0, block_sensitivity=False)
    prune(model, config, example_input=(X, PADDING))
    first = prune_report(model).removed["layers.0.self_attn"]
    prune(model, config, example_input=(X, PADDING))
    assert prune_report(model).heads["layers.0.self_attn"] == (3, 2)
    assert len(set(model.layers[0].self_attn.kept_heads) | set(first)) == 3


def test_a_zero_head_and_tiny_neurons_are_pruned_first_by_l1():
    model = tt.tiny_bert()
    layer = model.encoder.layer[0]
    small = [3, 9, 10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 62, 63]
    with torch.no_grad():
        for proj in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            proj.weight[16:24] = 0.0
        layer.attention.output.dense.weight[:, 16:24] = 0.0
        layer.intermediate.dense.weight[small] *= 1e-3
        layer.output.dense.weight[:, small] *= 1e-3
    prune(model, TransformerPruning(heads=1, ffn=0.25), example_input=tt.token_batch())
    report = prune_report(model)
    assert report.removed["encoder.layer.0.attention.self"] == [2]
    assert report.removed["encoder.layer.0"] == small
    # with its out-projection columns at zero the head contributes nothing: pruning it alone changes nothing
    assert report.sensitivity["encoder.layer.0.attention.self"] == {"removed": 1, "sqnr_db": math.inf, "cosine": pytest.approx(1.0)}


def test_label_free_taylor_prunes_the_head_whose_values_are_zero():
    model = tt.tiny_bert()
    value = model.encoder.layer[1].attention.self.value
    with torch.no_grad():
        value.weight[8:16] = 0.0
        value.bias[8:16] = 0.0
    samples = [{k: v[0] for k, v in tt.token_batch(1, 6 + i % 3, seed=i).items()} for i in range(12)]
    data = from_samples(calib=samples, eval=samples[:4])
    assert not data.labelled
    prune(model, TransformerPruning(heads=1, ffn=0.0, importance="taylor", batches=4), data=data)
    assert prune_report(model).removed["encoder.layer.1.attention.self"] == [1]


@pytest.mark.parametrize("heads, removed", [(2, 2), (0.5, 2), (0.3, 1), (0.9, 3), (0.0, 0)])
def test_heads_as_a_count_or_a_fraction_keep_at_least_one(heads, removed):
    model = tt.tiny_bert()
    prune(model, TransformerPruning(heads=heads, ffn=0.25, block_sensitivity=False), example_input=tt.token_batch())
    assert set(prune_report(model).heads.values()) == {(4, 4 - removed)}


def test_a_count_that_leaves_no_head_names_the_block():
    with pytest.raises(ConfigError, match=r"^TransformerPruning\.heads: 4 would remove every head of "
                                          r"encoder\.layer\.0\.attention\.self \(4 heads\); at most 3"):
        prune(tt.tiny_bert(), TransformerPruning(heads=4), example_input=tt.token_batch())


def test_layers_and_skip_select_blocks_by_any_enclosing_name():
    model = tt.tiny_bert()
    prune(model, TransformerPruning(heads=1, ffn=0.5, layers=("encoder.layer.0", "re:.*layer\\.1\\.attention"),
                                    skip=("encoder.layer.0.intermediate.dense",)), example_input=tt.token_batch())
    report = prune_report(model)
    assert report.heads == {"encoder.layer.0.attention.self": (4, 3), "encoder.layer.1.attention.self": (4, 3)}
    assert report.neurons == {}
    assert model.encoder.layer[1].intermediate.dense.out_features == 64


@pytest.mark.parametrize("layers, message", [
    (("embeddings.word_embeddings",), r"^TransformerPruning\.layers: 'embeddings\.word_embeddings' is a Embedding, "
                                      r"neither an attention block nor a feed-forward; recognised: attention: children "
                                      r"query/key/value.*the blocks found are encoder\.layer\.0 \(neurons\)"),
    (("encoder.layer.7",), r"^TransformerPruning\.layers: 'encoder\.layer\.7' matches no attention block or feed-forward"),
])
def test_a_layer_that_is_no_block_is_an_error_naming_it(layers, message):
    with pytest.raises(ConfigError, match=message):
        prune(tt.tiny_bert(), TransformerPruning(layers=layers), example_input=tt.token_batch())


def test_an_attention_without_a_head_count_says_what_is_missing():
    model = tt.tiny_bert()
    del model.encoder.layer[0].attention.self.num_attention_heads
    with pytest.raises(ConfigError, match=r"'encoder\.layer\.0\.attention\.self' is has query/key/value but no int "
                                          r"num_attention_heads or num_heads attribute"):
        prune(model, TransformerPruning(layers=("encoder.layer.0.attention.self",)), example_input=tt.token_batch())
    with pytest.raises(ConfigError, match=r"found no attention block or feed-forward in Linear"):
        prune(torch.nn.Linear(4, 4), TransformerPruning())


def test_sensitivity_is_each_block_masked_alone_and_leaves_the_model_as_it_was():
    model, x = tt.tiny_bert(), tt.token_batch()
    config = TransformerPruning(heads=1, ffn=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measured = block_sensitivity(model, config, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    prune(model, config, example_input=x)
    report = prune_report(model)
    assert report.sensitivity == measured
    reference, block = tt.tiny_bert(), "encoder.layer.1"
    expected = _out(reference, x)
    mask_units(reference, next(b for b in find_blocks(reference) if b.name == block), report.removed[block])
    assert measured[block] == {"removed": 32, **output_change(expected, _out(reference, x))}
    assert all(0.9 < s["cosine"] < 1.0 and 5.0 < s["sqnr_db"] < 60.0 for s in measured.values())


def test_the_pruned_model_exports_with_a_dynamic_sequence():
    model, x = tt.tiny_bert(), tt.token_batch()
    prune(model, TransformerPruning(heads=1, ffn=0.25), example_input=x)
    program = capture(model, x, dynamic={"input_ids": {1: (2, 16)}, "attention_mask": {1: (2, 16)}})
    longer = tt.token_batch(2, 13, seed=5)
    exported = primary(S.call(program.module(), longer))
    assert float((exported - _out(model, longer)).abs().max()) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="executorch is not installed")
def test_the_pruned_model_lowers_to_a_pte(tmp_path):
    from deepshrink.deploy import export

    torch.manual_seed(0)
    model = tt.TinyProj(layers=1).eval()
    prune(model, TransformerPruning(heads=1, ffn=0.5, block_sensitivity=False), example_input=X)
    result = export(model, tmp_path / "proj.pte", example_input=X)   # the parity gate runs the .pte against the module
    assert result.parity_max_abs_diff < 1e-5 and (tmp_path / "proj.pte").stat().st_size > 0


@pytest.mark.parametrize("config", [TransformerPruning(heads=1, ffn=0.5, importance="taylor", layers=("re:.*layer\\.0.*",)),
                                    TransformerPruning(heads=0.25, ffn=0.0, skip=("encoder.layer.1",), round_to=4)])
def test_config_survives_a_yaml_round_trip_keeping_count_and_fraction_apart(config):
    loaded = from_dict(TransformerPruning, yaml.safe_load(yaml.safe_dump(to_dict(config))))
    assert loaded == config and type(loaded.heads) is type(config.heads)


@pytest.mark.parametrize("build, message", [
    (lambda: TransformerPruning(heads=1.5), r"^heads: 1\.5 is outside \[0, 1\) for a fraction; write an integer \(heads: 1\)"),
    (lambda: TransformerPruning(heads=-1), r"^heads: -1 is negative"),
    (lambda: TransformerPruning(heads=True), r"^heads: True is not a number"),
    (lambda: TransformerPruning(ffn=1.0), r"^ffn: 1\.0 is outside \[0, 1\)"),
    (lambda: TransformerPruning(importance="l3"), r"^importance: 'l3' is not one of 'l1', 'l2', 'taylor'"),
    (lambda: TransformerPruning(heads=0, ffn=0.0), r"^heads: and ffn are both 0: nothing to prune"),
    (lambda: TransformerPruning(round_to=0), r"^round_to: 0 must be >= 1"),
    (lambda: from_dict(TransformerPruning, {"heads": 2, "neurons": 0.5}), r"TransformerPruning\.neurons: unknown key"),
    (lambda: from_dict(TransformerPruning, {"importance": "fisher"}), r"TransformerPruning\.importance: 'fisher' is not allowed"),
])
def test_bad_values_are_config_errors_naming_the_key(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_taylor_without_data_or_example_says_what_to_pass():
    with pytest.raises(ConfigError, match=r"^TransformerPruning\.importance: 'taylor' needs data"):
        prune(tt.tiny_bert(), TransformerPruning(importance="taylor"))


def test_a_recipe_names_it_transformer_and_the_report_has_plain_data():
    from deepshrink.pipeline.recipe import parse_prune

    stage = parse_prune({"method": "transformer", "heads": 1, "ffn": 0.25}, "stages[0].prune")
    assert stage.pruning == TransformerPruning(heads=1, ffn=0.25)
    model = tt.tiny_bert()
    prune(model, stage.pruning, example_input=tt.token_batch())
    report = prune_report(model).as_dict()
    assert report["heads"]["encoder.layer.0.attention.self"] == {"before": 4, "after": 3}
    assert report["neurons"]["encoder.layer.1"] == {"before": 64, "after": 48}
    assert report["sparsity"] == pytest.approx(1 - report["params_after"] / report["params_before"])
    assert yaml.safe_load(yaml.safe_dump(report)) == report


def test_a_recipe_can_turn_the_block_sensitivity_off():
    from deepshrink.pipeline.recipe import parse_prune

    stage = parse_prune({"method": "transformer", "heads": 1, "ffn": 0.5, "block_sensitivity": False}, "stages[0].prune")
    assert stage.pruning == TransformerPruning(heads=1, ffn=0.5, block_sensitivity=False)


def test_the_report_says_what_went_in_one_line():
    from deepshrink.pruning.structured import TransformerReport

    report = TransformerReport(heads={"a": (4, 3), "b": (4, 3)}, neurons={"f": (128, 64)}, params_before=1000, params_after=800)
    assert report.describe() == "heads 4->3 in 2 blocks, FFN neurons 128->64 in 1 block; params 1,000 -> 800 (20.0 % fewer)"
