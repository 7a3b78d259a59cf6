"""Fidelity figures, checked on constructed outputs whose answers are known."""
import math

import pytest
import torch
import torch.nn.functional as F

from deepshrink.evaluation.fidelity import fidelity, output_kind


def test_classification_agreement_overlap_and_kl():
    ref = torch.eye(10)[:8] * 5                         # 8 rows, class i wins row i
    out = ref.clone()
    out[0] = torch.eye(10)[9] * 5                       # one answer changed
    f = fidelity([(ref,)], [(out,)])
    assert f["kind"] == "classification" and f["top1_agreement"] == pytest.approx(7 / 8)
    assert fidelity([(ref,)], [(ref,)])["mean_kl"] == pytest.approx(0.0, abs=1e-7)
    # a file one float32 rounding away: its KL is 0 or a hair above, never negative
    assert 0 <= fidelity([(ref,)], [(ref * (1 + 1e-7),)])["mean_kl"] < 1e-12
    assert f["mean_kl"] > 0 and f["headline"] == "top1_agreement" and f["value"] == f["top1_agreement"]


def test_top5_overlap_is_a_set_overlap():
    ref = torch.tensor([[9.0, 8, 7, 6, 5, 0, 0, 0]])
    same_set = torch.tensor([[5.0, 6, 7, 8, 9, 0, 0, 0]])       # same five classes, order reversed
    three_of_five = torch.tensor([[9.0, 8, 7, 0, 0, 6, 5, 0]])
    assert fidelity([(ref,)], [(same_set,)])["top5_overlap"] == 1.0
    assert fidelity([(ref,)], [(three_of_five,)])["top5_overlap"] == pytest.approx(3 / 5)


def test_nearest_neighbour_is_another_sample_never_itself():
    from deepshrink.evaluation.fidelity import embedding

    ref = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]])   # pairs (0, 1), (2, 3)
    out = torch.tensor([[1.0, 0.1], [-1.0, 0.1], [1.0, 0.05], [-1.0, -0.1]])   # pairs (0, 2), (1, 3)
    assert embedding(ref, ref, k=1)["neighbour_overlap_at_1"] == 1.0
    assert embedding(ref, out, k=1)["neighbour_overlap_at_1"] == 0.0


def test_embeddings_cosine_and_neighbour_overlap():
    g = torch.Generator().manual_seed(0)
    ref = F.normalize(torch.randn(20, 16, generator=g), dim=-1)
    assert output_kind(ref) == "embedding"
    same = fidelity([(ref[:10],), (ref[10:],)], [(ref[:10],), (ref[10:],)])     # two batches pool
    assert same["cosine_min"] == pytest.approx(1.0) and same["neighbour_overlap_at_5"] == 1.0 and same["samples"] == 20
    shuffled = fidelity([(ref,)], [(ref[torch.randperm(20, generator=g)],)])
    assert shuffled["cosine_mean"] < 0.5 and shuffled["neighbour_overlap_at_5"] < 0.6


def test_tensor_outputs_sqnr_per_output():
    ref = torch.ones(4, 3, 5)
    noisy = ref + 0.1                                   # error power 1 % of signal: 20 dB
    f = fidelity([(ref, ref)], [(noisy, ref)])
    assert f["kind"] == "tensor" and f["sqnr_db"] == pytest.approx(20.0, abs=1e-4)
    assert f["outputs"][1]["sqnr_db"] is None and f["outputs"][1]["identical"] and f["outputs"][0]["max_abs_diff"] == pytest.approx(0.1, abs=1e-6)
    user = fidelity([(ref,)], [(noisy,)], metric=lambda r, p: {"mean_diff": float((p[0][0] - r[0][0]).mean())})
    assert user["user"]["mean_diff"] == pytest.approx(0.1, abs=1e-6)
