"""A tiny BERT encoder (transformers 5.24.0 ``BertModel``), randomly initialised, seed 0.

Import recipe: ``from transformers import BertConfig, BertModel`` (lazy; needs tokenizers,
huggingface_hub, safetensors, regex, pyyaml, tqdm, packaging, filelock, numpy, all present;
``typer`` is only for the CLI and not needed). No hub download: the weights come from
``BertModel(config)`` under ``torch.manual_seed(0)``, so they are the same on every call.

Model: 2 layers, hidden 64, 4 heads, FFN 128, vocab 1000, 128 positions; default attention
implementation (``config._attn_implementation`` is "sdpa"). Called with keyword tensors:
``model(input_ids=int64 [batch, seq], attention_mask=int64 [batch, seq])`` (``token_type_ids``
defaults to zeros), it returns a ``BaseModelOutputWithPoolingAndCrossAttentions`` (a ModelOutput,
dict- and tuple-like) with ``last_hidden_state`` float32 [batch, seq, 64] and ``pooler_output``
float32 [batch, 64] (``model(..., return_dict=False)`` gives that pair as a tuple). 143,552
parameters: ``nn.Embedding`` 72,320 (word 64,000, position 8,192, token type 128), ``nn.Linear``
70,592 (Q/K/V/O, FFN, pooler), ``nn.LayerNorm`` 640. Importing transformers also imports torchao,
which may log "Failed to load ... torchao/_C_*.so" (GPU kernels; harmless on CPU).

Samples: each a dict ``{"input_ids": int64 [1, seq], "attention_mask": int64 [1, seq]}`` (batch
dim 1 kept, as a tokenizer's ``return_tensors="pt"`` gives), seq in 2..128. Token 2 plays [CLS],
3 [SEP], 0 [PAD] (the config's pad_token_id); the rest are uniform in 5..999. About a third of the
samples end in padding (ids 0, mask 0) after the [SEP]. Calibration seed 0, evaluation seed 1.

Export: ``torch.export.export(model, (), sample, dynamic_shapes={"input_ids": {0: batch, 1: seq},
"attention_mask": {0: batch, 1: seq}})`` with seq max 128 exports, lowers (.pte) and goes to ONNX;
the example must have batch >= 2 (a batch-1 example specialises the batch dim).
"""
from __future__ import annotations

import torch
from torch import nn

CLS, SEP, PAD = 2, 3, 0


def tiny_bert() -> nn.Module:
    """Randomly initialised (seed 0) 2-layer BERT, hidden 64, eval mode."""
    return _seeded_bert(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)


def minilm_sized_bert() -> nn.Module:
    """A BERT of all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, FFN 1536, vocab
    30,522, 512 positions: 22.7 M parameters, the sentence encoder of the issue "Compress real
    models well"), randomly initialised, seed 0, eval mode. No download: its *bytes* are those of
    the real model, its weights are not, so it measures file sizes and speed, not trained fidelity."""
    return _seeded_bert(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)


def _seeded_bert(**config) -> nn.Module:
    """``BertModel(BertConfig(**config))`` built under seed 0, the caller's RNG state left as it was."""
    from transformers import BertConfig, BertModel

    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = BertModel(BertConfig(**config))
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def _samples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        seq = int(torch.randint(2, 129, (1,), generator=g))
        real = seq if seq < 4 or torch.rand(1, generator=g) < 0.67 else int(torch.randint(2, seq, (1,), generator=g))
        ids = torch.full((seq,), PAD, dtype=torch.int64)
        ids[:real] = torch.randint(5, 1000, (real,), generator=g)
        ids[0], ids[real - 1] = CLS, SEP
        mask = (torch.arange(seq) < real).to(torch.int64)
        out.append({"input_ids": ids[None], "attention_mask": mask[None]})
    return out


def calibration_samples(n: int = 64) -> list[dict[str, torch.Tensor]]:
    """``n`` dicts of int64 ``[1, seq]`` tensors, seq in 2..128, seed 0."""
    return _samples(n, seed=0)


def evaluation_samples(n: int = 64) -> list[dict[str, torch.Tensor]]:
    """``n`` dicts of int64 ``[1, seq]`` tensors, seq in 2..128, seed 1."""
    return _samples(n, seed=1)
