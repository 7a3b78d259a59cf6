"""Quantization configs: one frozen dataclass per scheme, dispatched by type.

``fp32_layers`` (every scheme): module names or ``re:`` patterns left in float, e.g.
``("conv1", "re:classifier.*")`` — the escape hatch for the one layer that breaks; a pattern
that matches no module is an error at ``quantize`` time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from deepshrink.core.config import check
from deepshrink.core.loops import TrainConfig
from deepshrink.core.targets import INT8_LAYOUTS, Int8Layout

Calibration = Literal["minmax", "histogram", "percentile", "mse", "entropy", "auto"]
Equalization = Literal["none", "cle", "cle_relu6_as_relu"]
Rounding = Literal["nearest", "adaround"]
RecurrentRounding = Literal["nearest", "gptq"]
EmbeddingBits = bool | Literal[4, 8]   # True means 8
DEFAULT_PERCENTILE = 99.99


@dataclass(frozen=True)
class MixedPrecision:
    """Keep in float the few layers that cause the int8 loss, chosen by measured sensitivity
    (``quantization.mixed_precision``): per layer, the whole model's output SQNR against the float
    model on the calibration samples with that one layer in float; greedy, re-measured after each pick.
    The int8 outputs that a float op reads (a residual add before a LayerNorm) are candidates as well,
    at no bytes.

    ``max_layers``: at most this many layers float. ``min_gain_db``: a layer is kept float only if
    it raises the output SQNR by at least this much. ``max_growth``: the float layers' extra bytes
    (3 per weight) at most this share of the int8 weight bytes, so the file stays small.
    ``target_sqnr_db``: stop as soon as the output SQNR reaches it (``None``: use the whole budget).
    The model is then quantized again with those layers float and kept only if fidelity does not drop.
    """

    max_layers: int = 3
    min_gain_db: float = 0.5
    max_growth: float = 0.25
    target_sqnr_db: float | None = None

    def __post_init__(self) -> None:
        check(self.max_layers >= 1, "max_layers", f"{self.max_layers} must be >= 1 (or leave mixed_precision out)")
        check(self.min_gain_db >= 0, "min_gain_db", f"{self.min_gain_db} must be >= 0 (dB of output SQNR)")
        check(self.max_growth > 0, "max_growth", f"{self.max_growth} must be > 0 (a share of the int8 weight bytes, e.g. 0.25)")


@dataclass(frozen=True)
class Int8Static:
    """W8A8 post-training quantization: int8 weights, int8 activations calibrated on data.

    ``calibration`` picks each activation's range from a histogram of ``calibration_samples``
    samples of ``data.calib``:

    - ``minmax``: the observed min and max (an outlier stretches the grid for everyone);
    - ``histogram``: the range minimising the L2 error of the histogram (PyTorch's search,
      XNNPACK's default);
    - ``percentile``: clip both tails at ``percentile`` (99.99 keeps all but 1 in 10,000);
    - ``mse``: grid search for the range of least expected squared error (rounding + clipping);
    - ``entropy``: the clipping threshold of least KL divergence (TensorRT's calibration);
    - ``auto``: each of the five, from the same calibration pass, measured by the int8 model's
      output SQNR against the float model on the calibration samples; the best is used and
      ``quantize_report`` lists them all (``calibration_search``). Which wins depends on the model
      (on the tiny BERT example, percentile: ``examples/recipes/bert.yaml``).

    ``per_channel``: one weight scale per output channel; ``None`` takes the target's setting.
    ``bias_correction``: after conversion, add to each layer's bias the mean output error
    (float minus quantized) over the calibration samples, each layer after the ones before it
    (empirical bias correction, Nagel et al. 2019 §4.2; four batched passes whatever the depth);
    it lives in the bias, so it survives export.
    ``rounding``: how each int8 weight is put on its grid: ``nearest`` rounds it to the nearest
    code; ``adaround`` (Nagel et al. 2020) learns per weight whether to round down or up so each
    conv/linear layer's output (after its ReLU/ReLU6) on the calibration samples stays closest to
    the float layer's, each layer fed by the int8 model re-rounded so far; the scales stay the
    observer's, every code moves by at most 1, and a layer keeps the learned codes only where they
    reconstruct better. Its cost is training: 400 steps per layer (mobile-cnn, 18 layers: 25-49 s
    on one thread of a shared 2-core machine). It runs after equalization and before bias
    correction. On mobile-cnn (Fashion-MNIST, ``bench/results/repairs.md``) it mattered most in
    ONNX Runtime's guarded layout: 99.13 -> 99.43 % top-1 agreement with fp32 in the .onnx; .pte
    99.53 -> 99.54 %.
    ``equalization``: cross-layer equalization before quantization: ``cle`` rescales
    conv/linear pairs joined by ReLU (exact in float) and skips, with the reason recorded, the
    pairs joined by a clip (ReLU6, hardtanh, clamp): scaling across a clip changes the float
    function. ``cle_relu6_as_relu`` also equalizes across ReLU6 by replacing it with ReLU, as
    Nagel et al. do for MobileNetV2: this CHANGES THE FLOAT MODEL wherever an activation exceeded 6.
    These repairs are each kept only if neither int8 top-1 agreement with the original float model nor
    its SQNR drops on the calibration samples (both, since a few hundred samples move agreement in
    coarse steps); ``quantize_report`` says which were kept. The guard sees calibration samples
    only: on held-out data a kept repair can still cost a few answers (``bench/results/repairs.md``).
    LSTM and GRU weight matrices are int8 per output row too (weight-only: the graph and the
    ``.onnx`` compute the cell in float from int8 constants; the ``.pte`` rounds each step's linear
    input to int8 per row, XNNPACK's qd8-f32-qc8w); name the cell in ``fp32_layers`` to keep it float.
    ``recurrent_rounding``: how those matrices are put on their grids: ``gptq`` (the default)
    rounds each one column by column with the error spread over the columns not yet rounded
    (GPTQ, Frantar et al. 2022), measured on the matrix's own inputs in the calibration samples,
    and scales the first layer's input channels by their magnitude before its rows are quantized
    (AWQ, Lin et al. 2023: one ``mul`` on the cell's input); kept only if the int8 model's fidelity
    on the calibration samples does not drop (``quantization.recurrent_rounding``). ``nearest``:
    nearest rounding on the observer's grid. On the Resemblyzer speaker encoder it is what keeps a
    3-layer LSTM int8 on power mel frames (``bench/results/examples.md``).
    ``int8_layout``: activation dtype and weight range (``core.targets.INT8_LAYOUTS``); ``None``
    takes the target's (``s8s8`` for XNNPACK, ``u8s8-guarded`` for ONNX Runtime: int8 weights,
    7-bit only in the output channels whose pair sums ONNX Runtime's x86 kernels would saturate on
    CPUs without VNNI, measured on the calibration samples: ``quantization.weight_range``; QAT trains
    the 7-bit ``-reduced`` layout in instead).
    ``embeddings``: embedding tables (a transformer's vocabulary: often half its bytes, and the
    position tables too) stored int8, one symmetric scale per row; ``4``: 4 bits a weight, half
    the bytes again in both files (ExecuTorch looks rows up with ``embedding_4bit``), at a cost in
    fidelity: a 4-bit table's error reaches every token (a tiny BERT's last hidden state: 31.4 dB
    SQNR at 8 bits, 19.3 at 4), so it is opt-in; ``False`` keeps them float.
    ``mixed_precision``: a ``MixedPrecision`` to keep the layers that cost most fidelity in float,
    chosen by measuring each one's effect on the output (after every other repair); ``None``: none.
    ``float_outputs``: the conv/linear layers that compute the model's outputs (through activations
    and reshapes only: a classifier's last linear before its softmax or sigmoid) keep int8 weights but
    quantize their input at run time and give float results (XNNPACK's qd8-f32-qc8w; ONNX: the input
    quantized by ops in the graph), so the file is as small, while static int8 would round each output
    to one of 256 codes: near-equal scores then tie, and argmax takes the lower index (CREPE's pitch
    bins: every lost answer of its int8 file was such a tie, ``examples/recipes/crepe-tiny.yaml``).
    """

    calibration: Calibration = "histogram"
    percentile: float = DEFAULT_PERCENTILE
    calibration_samples: int = 256
    per_channel: bool | None = None
    bias_correction: bool = False
    equalization: Equalization = "none"
    rounding: Rounding = "nearest"
    recurrent_rounding: RecurrentRounding = "gptq"
    fp32_layers: tuple[str, ...] = ()
    int8_layout: Int8Layout | None = None
    embeddings: EmbeddingBits = True
    mixed_precision: MixedPrecision | None = None
    float_outputs: bool = False

    def __post_init__(self) -> None:
        _check_embeddings(self.embeddings)
        check(self.calibration_samples >= 1, "calibration_samples", f"{self.calibration_samples} must be >= 1")
        check(50.0 < self.percentile <= 100.0, "percentile",
              f"{self.percentile} is outside (50, 100]; it is the share of values kept, e.g. 99.99")
        check(self.calibration in ("percentile", "auto") or self.percentile == DEFAULT_PERCENTILE, "percentile",
              f"{self.percentile} has no effect with calibration={self.calibration!r}; set calibration='percentile' or drop it")
        _check_layout(self.int8_layout)


@dataclass(frozen=True)
class Int8Dynamic:
    """Int8 weights; activations quantized per batch at run time (no calibration needed).

    XNNPACK runs dynamically quantized linears and 2-D convolutions only with per-channel
    weights, so ``per_channel=False`` is refused for the ``xnnpack`` target.
    ``embeddings``: as for ``Int8Static`` (``True``/``8`` int8 per row, ``4`` 4-bit, ``False`` float).
    """

    per_channel: bool | None = None
    fp32_layers: tuple[str, ...] = ()
    int8_layout: Int8Layout | None = None
    embeddings: EmbeddingBits = True

    def __post_init__(self) -> None:
        _check_embeddings(self.embeddings)
        _check_layout(self.int8_layout)


@dataclass(frozen=True)
class Int8QAT:
    """Quantization-aware training: fake-quantized W8A8 fine-tuning, then conversion to int8.

    ``train``: the fine-tuning of the fake-quantized graph over ``data.train`` (batch norm stays
    live and is folded at conversion), run by ``quantize``'s ``train_fn`` (``core.loops``;
    ``deepshrink.quantize`` passes ``deepshrink.training.fit``).
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=1e-4))
    per_channel: bool | None = None
    fp32_layers: tuple[str, ...] = ()
    int8_layout: Int8Layout | None = None

    # the flat training keys of earlier releases, for the message that says where they went
    MOVED_KEYS: ClassVar[dict[str, str]] = {k: f"train.{k}" for k in ("epochs", "lr", "optimizer", "batch_size", "lr_schedule", "seed")}

    def __post_init__(self) -> None:
        check(self.train.epochs >= 1, "train.epochs", f"{self.train.epochs} must be >= 1; use Int8Static for no training")
        _check_layout(self.int8_layout)


@dataclass(frozen=True)
class Int8WithinBudget:
    """Int8 that must lose at most ``max_drop_pt`` accuracy points on validation: PTQ with
    ``ptq``; if that misses, leave the lowest-SQNR layers in fp32 one at a time (up to
    ``max_fp32_layers``); if that still misses, QAT with ``qat``. What was tried is recorded."""

    max_drop_pt: float = 0.5
    ptq: Int8Static = field(default_factory=Int8Static)
    qat: Int8QAT = field(default_factory=Int8QAT)
    max_fp32_layers: int = 3

    def __post_init__(self) -> None:
        check(self.max_drop_pt >= 0, "max_drop_pt", f"{self.max_drop_pt} must be >= 0 (accuracy points, e.g. 0.5)")
        check(self.max_fp32_layers >= 0, "max_fp32_layers", f"{self.max_fp32_layers} must be >= 0")


def _check_layout(layout: str | None) -> None:
    check(layout is None or layout in INT8_LAYOUTS, "int8_layout",
          f"{layout!r} is not one of {', '.join(INT8_LAYOUTS)} (or null for the target's)")


def _check_embeddings(value) -> None:
    check(isinstance(value, bool) or value in (4, 8), "embeddings",
          f"{value!r} is not true, false, 8 or 4 (bits a weight of each embedding table)")
