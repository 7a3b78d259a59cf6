"""A corpus of bad recipes: each is refused at validation, before anything runs, by one
``ConfigError`` that lists every fault with its key path (and, through the CLI, one line and
exit code 2). Recipes are YAML text written to files, read the way ``deepshrink validate`` reads them."""
import time

import pytest

from deepshrink.cli import main
from deepshrink.core.errors import ConfigError
from deepshrink.pipeline import load_recipe
from deepshrink.pipeline.recipe_file import MAX_BYTES, MAX_DEPTH

HEAD = "name: t\nmodel: lenet-5\ndata: {name: digits}\n"


def top(text: str) -> str:
    """A recipe whose top level gets ``text`` (a valid train stage follows)."""
    return f"{text}\nstages:\n  - train: {{epochs: 1}}\n"


def stages(*items: str) -> str:
    return HEAD + "stages:\n" + "".join(f"  - {item}\n" for item in items)


def billion_laughs() -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "\n".join(lines) + "\n" + stages("train: {epochs: 1}")


def alias_chain() -> str:
    """Each anchor nests the previous one 10 levels down: shallow as written, deep once expanded."""
    lines, previous = [], '"x"'
    for i in range(8):
        lines.append(f"a{i}: &a{i} " + "[" * 10 + previous + "]" * 10)
        previous = f"*a{i}"
    return "\n".join(lines) + "\n" + stages("train: {epochs: 1}")


# (id, recipe text or bytes, expected problems: each a prefix of one reported problem)
CASES = [
    # --- the top level -------------------------------------------------------------------
    ("unknown-top-key", top(HEAD + "modle: x"), ["recipe.modle: unknown key; allowed keys: name, model"]),
    ("name-path", top("name: ../escape"), ["recipe.name: '../escape' is not a plain name"]),
    ("name-empty", top("name: ''"), ["recipe.name: '' is not a plain name"]),
    ("name-list", top("name: [a, b]"), ["recipe.name: expected a string, got ['a', 'b']"]),
    ("model-unknown", top("name: t\nmodel: resnet-9000"), ["model: 'resnet-9000' is not a zoo model"]),
    ("model-near-miss", top("name: t\nmodel: lenet5"), ["model: 'lenet5' is not a zoo model"]),
    ("model-missing-checkpoint", top("name: t\nmodel: absent.safetensors"), ["model: checkpoint absent.safetensors does not exist"]),
    ("model-missing-file", top("name: t\nmodel: 'absent.py:Net'"), ["model: file absent.py does not exist"]),
    ("model-number", top("name: t\nmodel: 5"), ["recipe.model: expected a string, got 5"]),
    ("target-unknown", top("name: t\ntarget: tpu"), ["target: 'tpu' is not allowed; choose one of 'xnnpack', 'onnxruntime'"]),
    ("target-near-miss", top("name: t\ntarget: xnnpak"), ["target: 'xnnpak' is not allowed"]),
    ("seed-negative", top("name: t\nseed: -1"), ["recipe.seed: -1 is outside [0, 2^63)"]),
    ("seed-float", top("name: t\nseed: 1.5"), ["recipe.seed: expected an integer, got 1.5"]),
    ("seed-too-big", top("name: t\nseed: 18446744073709551616"), ["recipe.seed: 18446744073709551616 is outside [0, 2^63)"]),
    ("model-args-list", top("name: t\nmodel_args: [1]"), ["recipe.model_args: expected a mapping"]),
    ("outputs-string", top("name: t\noutputs: logits"), ["recipe.outputs: expected a list of str, got 'logits'"]),
    # --- data ------------------------------------------------------------------------------
    ("data-list", top("name: t\ndata: [digits]"), ["recipe.data: expected a mapping of name, data_dir"]),
    ("data-unknown", top("name: t\ndata: {name: mnistt}"), ["recipe.data.name: 'mnistt' is not a dataset"]),
    ("image-size-negative", top("name: t\ndata: {image_size: -5}"), ["recipe.data.image_size: -5 is outside 1..4096"]),
    ("image-size-zero", top("name: t\ndata: {image_size: 0}"), ["recipe.data.image_size: 0 is outside 1..4096"]),
    ("image-size-huge", top("name: t\ndata: {image_size: 100000}"), ["recipe.data.image_size: 100000 is outside 1..4096"]),
    ("image-size-string", top("name: t\ndata: {image_size: '28'}"), ["recipe.data.image_size: expected an integer, got '28'"]),
    ("calib-size-negative", top("name: t\ndata: {calib_size: -3}"), ["recipe.data.calib_size: -3 must be >= 1"]),
    ("calib-size-zero", top("name: t\ndata: {calib_size: 0}"), ["recipe.data.calib_size: 0 must be >= 1"]),
    ("data-unknown-key", top("name: t\ndata: {name: digits, size: 3}"), ["recipe.data.size: unknown key"]),
    ("data-download-string", top("name: t\ndata: {download: maybe}"), ["recipe.data.download: expected true or false, got 'maybe'"]),
    ("data-calib-not-spec", top("name: t\ndata: {calib: mine, eval: 'e.py:f'}"), ["recipe.data.calib: 'mine' is not path/to/file.py:NAME"]),
    ("data-calib-without-eval", top("name: t\ndata: {calib: 'c.py:f'}"), ["recipe.data.eval: your own data needs both calib: and eval:"]),
    ("data-seed-negative", top("name: t\ndata: {seed: -2}"), ["recipe.data.seed: -2 is outside [0, 2^63)"]),
    # --- the list of stages ----------------------------------------------------------------
    ("stages-missing", HEAD, ["stages: required, a non-empty list"]),
    ("stages-empty", HEAD + "stages: []\n", ["stages: required, a non-empty list"]),
    ("stages-mapping", HEAD + "stages: {train: {}}\n", ["stages: required, a non-empty list of stages such as '- train: {epochs: 5}'; got {'train': {}}"]),
    ("stage-scalar", stages("5"), ["stages[0]: a stage is a mapping with one key"]),
    ("stage-two-keys", stages("{train: {}, prune: {}}"), ["stages[0]: a stage is a mapping with one key"]),
    ("stage-unknown", stages("trian: {}"), ["stages[0].trian: unknown stage; allowed stages: train, load"]),
    ("stage-body-list", stages("train: [1, 2]"), ["stages[0].train: expected a mapping of options, got [1, 2]"]),
    ("order-prune-after-quantize", stages("quantize: {scheme: int8-dynamic}", "prune: {method: magnitude}"),
     ["stages[1].prune: must come before quantize"]),
    ("order-two-quantize", stages("quantize: {scheme: int8-dynamic}", "quantize: {scheme: int8-dynamic}"),
     ["stages[1].quantize: the model is already quantized by stages[0]"]),
    ("order-report-first", stages("report: {}"), ["stages[0].report: needs an evaluate stage before it"]),
    ("order-load-second", stages("train: {}", "load: {checkpoint: m.safetensors}"),
     ["stages[1].load: load must be the first stage", "stages[1].load.checkpoint: m.safetensors does not exist"]),
    # --- train / finetune ------------------------------------------------------------------
    ("lr-inf-exponent", stages("train: {lr: 1e309}"), ["stages[0].train.lr: must be a finite number, got inf"]),
    ("lr-inf", stages("train: {lr: .inf}"), ["stages[0].train.lr: must be a finite number, got inf"]),
    ("lr-negative", stages("train: {lr: -0.1}"), ["stages[0].train.lr: -0.1 must be > 0"]),
    ("lr-zero", stages("train: {lr: 0}"), ["stages[0].train.lr: 0.0 must be > 0"]),
    ("lr-string", stages("train: {lr: fast}"), ["stages[0].train.lr: expected a number, got 'fast'"]),
    ("lr-bool", stages("train: {lr: true}"), ["stages[0].train.lr: expected a number, got True"]),
    ("momentum-nan", stages("train: {momentum: .nan}"), ["stages[0].train.momentum: must be a finite number, got nan"]),
    ("momentum-above-one", stages("train: {momentum: 1.5}"), ["stages[0].train.momentum: 1.5 is outside [0, 1)"]),
    ("momentum-negative", stages("train: {momentum: -0.1}"), ["stages[0].train.momentum: -0.1 is outside [0, 1)"]),
    ("weight-decay-negative", stages("train: {weight_decay: -1}"), ["stages[0].train.weight_decay: -1.0 must be >= 0"]),
    ("epochs-negative", stages("train: {epochs: -1}"), ["stages[0].train.epochs: -1 must be >= 0"]),
    ("epochs-string", stages("train: {epochs: ten}"), ["stages[0].train.epochs: expected an integer, got 'ten'"]),
    ("epochs-float", stages("train: {epochs: 2.5}"), ["stages[0].train.epochs: expected an integer, got 2.5"]),
    ("batch-size-zero", stages("train: {batch_size: 0}"), ["stages[0].train.batch_size: 0 must be >= 1"]),
    ("optimizer-unknown", stages("train: {optimizer: adamw}"), ["stages[0].train.optimizer: 'adamw' is not allowed; choose one of 'adam', 'sgd'"]),
    ("lr-schedule-unknown", stages("train: {lr_schedule: linear}"), ["stages[0].train.lr_schedule: 'linear' is not allowed"]),
    ("patience-negative", stages("train: {early_stopping_patience: -1}"), ["stages[0].train.early_stopping_patience: -1 must be >= 0"]),
    ("shift-negative", stages("train: {random_shift: -2}"), ["stages[0].train.random_shift: -2 must be >= 0 pixels"]),
    ("keep-best-string", stages("train: {keep_best: sure}"), ["stages[0].train.keep_best: expected true or false, got 'sure'"]),
    ("distill-temperature-zero", stages("train: {distill: {temperature: 0}}"), ["stages[0].train.distill.temperature: 0.0 must be > 0"]),
    ("distill-alpha-above-one", stages("train: {distill: {alpha: 1.5}}"), ["stages[0].train.distill.alpha: 1.5 is outside [0, 1]"]),
    ("distill-number", stages("train: {distill: 0.5}"), ["stages[0].train.distill: expected a mapping of temperature, alpha, loss, got 0.5"]),
    ("train-unknown-key", stages("train: {learning_rate: 0.1}"), ["stages[0].train.learning_rate: unknown key; allowed keys: epochs, lr"]),
    ("train-seed-negative", stages("train: {seed: -4}"), ["stages[0].train.seed: -4 is outside [0, 2^63)"]),
    ("finetune-lr-negative", stages("train: {}", "finetune: {lr: -1}"), ["stages[1].finetune.lr: -1.0 must be > 0"]),
    # --- prune -----------------------------------------------------------------------------
    ("prune-method-missing", stages("prune: {sparsity: 0.5}"), ["stages[0].prune.method: required; choose one of 'magnitude'"]),
    ("prune-method-unknown", stages("prune: {method: lottery}"), ["stages[0].prune.method: 'lottery' is not allowed"]),
    ("prune-method-near-miss", stages("prune: {method: magnitud}"), ["stages[0].prune.method: 'magnitud' is not allowed"]),
    ("sparsity-above-one", stages("prune: {method: magnitude, sparsity: 1.5}"), ["stages[0].prune.sparsity: 1.5 is outside [0, 1)"]),
    ("sparsity-one", stages("prune: {method: magnitude, sparsity: 1}"), ["stages[0].prune.sparsity: 1.0 is outside [0, 1)"]),
    ("sparsity-negative", stages("prune: {method: magnitude, sparsity: -0.1}"), ["stages[0].prune.sparsity: -0.1 is outside [0, 1)"]),
    ("sparsity-nan", stages("prune: {method: magnitude, sparsity: .nan}"), ["stages[0].prune.sparsity: must be a finite number, got nan"]),
    ("sparsity-missing-value", stages("prune: {method: magnitude, sparsity: null}"), ["stages[0].prune.sparsity: is required for MagnitudePruning"]),
    ("scope-unknown", stages("prune: {method: magnitude, scope: everywhere}"), ["stages[0].prune.scope: 'everywhere' is not allowed"]),
    ("norm-unknown", stages("prune: {method: magnitude, norm: l3}"), ["stages[0].prune.norm: 'l3' is not allowed"]),
    ("pattern-base-60", stages("prune: {method: magnitude, pattern: 2:4}"), ["stages[0].prune.pattern: got the number 124"]),
    ("pattern-garbage", stages("prune: {method: magnitude, pattern: '3x'}"), ["stages[0].prune.pattern: '3x' is not a pattern"]),
    ("pattern-sparsity-mismatch", stages("prune: {method: magnitude, sparsity: 0.6, pattern: '2:4'}"),
     ["stages[0].prune.sparsity: 0.6 does not match pattern 2:4"]),
    ("overrides-out-of-range", stages("prune: {method: magnitude, overrides: {fc1: 1.2}}"), ["stages[0].prune.overrides.fc1: 1.2 is outside [0, 1)"]),
    ("groups-out-of-range", stages("prune: {method: magnitude, groups: {fc1: -0.5}}"), ["stages[0].prune.groups.fc1: -0.5 is outside [0, 1)"]),
    ("layers-string", stages("prune: {method: magnitude, layers: fc1}"), ["stages[0].prune.layers: expected a list of str, got 'fc1'"]),
    ("gradient-batches-zero", stages("prune: {method: gradient, batches: 0}"), ["stages[0].prune.batches: 0 must be >= 1"]),
    ("taylor-batch-size-zero", stages("prune: {method: taylor, batch_size: 0}"), ["stages[0].prune.batch_size: 0 must be >= 1"]),
    ("remove-dead-string", stages("prune: {method: magnitude, remove_dead: sure}"), ["stages[0].prune.remove_dead: expected true or false"]),
    ("prune-unknown-key", stages("prune: {method: magnitude, sparsty: 0.5}"), ["stages[0].prune.sparsty: unknown key"]),
    ("schedule-unknown", stages("prune: {method: magnitude, schedule: {cubic: {}}, retrain: {}}"),
     ["stages[0].prune.schedule.cubic: unknown schedule; choose one of one-shot, iterative, gradual"]),
    ("schedule-without-retrain", stages("prune: {method: magnitude, schedule: {gradual: {steps: 4}}}"),
     ["stages[0].prune.retrain: a schedule needs retrain epochs between prunes"]),
    ("iterative-epochs-per-step-zero", stages("prune: {method: magnitude, sparsity: 0.9, schedule: {iterative: {epochs_per_step: 0}}, retrain: {}}"),
     ["stages[0].prune.schedule.iterative.epochs_per_step: 0 must be >= 1"]),
    ("iterative-not-rising", stages("prune: {method: magnitude, sparsity: 0.9, schedule: {iterative: {sparsities: [0.8, 0.5]}}, retrain: {}}"),
     ["stages[0].prune.schedule.iterative.sparsities: [0.8, 0.5] must rise step by step"]),
    ("iterative-stop-above-target", stages("prune: {method: magnitude, sparsity: 0.5, schedule: {iterative: {sparsities: [0.6]}}, retrain: {}}"),
     ["stages[0].prune.schedule.iterative.sparsities: [0.6] must stay below the target sparsity 0.5"]),
    ("gradual-steps-zero", stages("prune: {method: magnitude, schedule: {gradual: {steps: 0}}, retrain: {}}"),
     ["stages[0].prune.schedule.gradual.steps: 0 must be >= 1"]),
    ("gradual-interval-zero", stages("prune: {method: magnitude, schedule: {gradual: {interval: 0}}, retrain: {}}"),
     ["stages[0].prune.schedule.gradual.interval: 0 must be >= 1"]),
    ("gradual-initial-one", stages("prune: {method: magnitude, schedule: {gradual: {initial: 1.0}}, retrain: {}}"),
     ["stages[0].prune.schedule.gradual.initial: 1.0 is outside [0, 1)"]),
    ("gradual-retrain-too-short", stages("prune: {method: magnitude, schedule: {gradual: {steps: 8}}, retrain: {epochs: 3}}"),
     ["stages[0].prune.retrain.epochs: 3 ends before the schedule's last prune at epoch 8"]),
    ("retrain-lr-inf", stages("prune: {method: magnitude, retrain: {lr: .inf}}"), ["stages[0].prune.retrain.lr: must be a finite number, got inf"]),
    ("sensitivity-sparsity-one", stages("prune: {method: magnitude, sensitivity: {sparsities: [1.0]}}"),
     ["stages[0].prune.sensitivity.sparsities[0]: 1.0 is outside (0, 1)"]),
    ("sensitivity-max-drop-negative", stages("prune: {method: magnitude, sensitivity: {max_drop: -1}}"),
     ["stages[0].prune.sensitivity.max_drop: must be >= 0"]),
    ("sensitivity-with-overrides", stages("prune: {method: magnitude, overrides: {fc1: 0.5}, sensitivity: {}}"),
     ["stages[0].prune.sensitivity: proposes per-layer sparsities itself"]),
    ("variational-kl-weight-zero", stages("prune: {method: variational, kl_weight: 0}"), ["stages[0].prune.kl_weight: 0.0 must be > 0"]),
    ("variational-kl-warmup-two", stages("prune: {method: variational, kl_warmup: 2}"), ["stages[0].prune.kl_warmup: 2.0 is outside [0, 1]"]),
    ("variational-train-epochs-zero", stages("prune: {method: variational, train: {epochs: 0}}"), ["stages[0].prune.train.epochs: must be >= 1"]),
    ("variational-schedule-without-sparsity", stages("prune: {method: variational, schedule: {gradual: {}}, retrain: {}}"),
     ["stages[0].prune.schedule: VariationalDropout without a sparsity"]),
    ("channels-ratio-one", stages("prune: {method: channels, ratio: 1.0}"), ["stages[0].prune.ratio: 1.0 is outside [0, 1)"]),
    ("channels-importance-unknown", stages("prune: {method: channels, importance: gradient}"), ["stages[0].prune.importance: 'gradient' is not allowed"]),
    ("channels-round-to-zero", stages("prune: {method: channels, round_to: 0}"), ["stages[0].prune.round_to: 0 must be >= 1"]),
    ("channels-steps-zero", stages("prune: {method: channels, steps: 0}"), ["stages[0].prune.steps: 0 must be >= 1"]),
    ("channels-with-schedule", stages("prune: {method: channels, schedule: {gradual: {}}, retrain: {}}"),
     ["stages[0].prune: method 'channels' prunes in its own `steps`"]),
    # --- quantize --------------------------------------------------------------------------
    ("scheme-missing", stages("quantize: {}"), ["stages[0].quantize.scheme: required; choose one of 'int8-static'"]),
    ("scheme-near-miss", stages("quantize: {scheme: int8-statik}"), ["stages[0].quantize.scheme: 'int8-statik' is not allowed"]),
    ("calibration-unknown", stages("quantize: {scheme: int8-static, calibration: kl}"), ["stages[0].quantize.calibration: 'kl' is not allowed"]),
    ("percentile-above-100", stages("quantize: {scheme: int8-static, calibration: percentile, percentile: 200}"),
     ["stages[0].quantize.percentile: 200.0 is outside (50, 100]"]),
    ("percentile-without-percentile-calibration", stages("quantize: {scheme: int8-static, percentile: 99}"),
     ["stages[0].quantize.percentile: 99.0 has no effect with calibration='histogram'"]),
    ("calibration-samples-zero", stages("quantize: {scheme: int8-static, calibration_samples: 0}"),
     ["stages[0].quantize.calibration_samples: 0 must be >= 1"]),
    ("int8-layout-unknown", stages("quantize: {scheme: int8-static, int8_layout: u4u4}"), ["stages[0].quantize.int8_layout: 'u4u4'"]),
    ("equalization-bool", stages("quantize: {scheme: int8-static, equalization: yes}"), ["stages[0].quantize.equalization: True is not allowed"]),
    ("qat-epochs-zero", stages("quantize: {scheme: int8-qat, train: {epochs: 0}}"), ["stages[0].quantize.train.epochs: 0 must be >= 1"]),
    ("qat-lr-inf", stages("quantize: {scheme: int8-qat, train: {lr: .inf}}"), ["stages[0].quantize.train.lr: must be a finite number, got inf"]),
    ("qat-flat-epochs-moved", stages("quantize: {scheme: int8-qat, epochs: 2}"),
     ["stages[0].quantize.epochs: moved to train.epochs; write train: {epochs: 2, lr: 0.0001}"]),
    ("budget-max-drop-negative", stages("quantize: {scheme: int8-budget, max_drop_pt: -1}"), ["stages[0].quantize.max_drop_pt: -1.0 must be >= 0"]),
    ("budget-max-fp32-negative", stages("quantize: {scheme: int8-budget, max_fp32_layers: -1}"), ["stages[0].quantize.max_fp32_layers: -1 must be >= 0"]),
    ("budget-nested-ptq", stages("quantize: {scheme: int8-budget, ptq: {calibration: percentile, percentile: 20}}"),
     ["stages[0].quantize.ptq.percentile: 20.0 is outside (50, 100]"]),
    ("bits-one", stages("quantize: {scheme: weight-only, bits: 1}"), ["stages[0].quantize.bits: 1 is outside 2..8"]),
    ("bits-sixteen", stages("quantize: {scheme: weight-only, bits: 16}"), ["stages[0].quantize.bits: 16 is outside 2..8"]),
    ("bits-float", stages("quantize: {scheme: weight-only, bits: 3.5}"), ["stages[0].quantize.bits: expected an integer, got 3.5"]),
    ("layer-bits-nine", stages("quantize: {scheme: weight-only, layers: {fc1: 9}}"), ["stages[0].quantize.layers.fc1: 9 is outside 2..8"]),
    ("group-size-missing", stages("quantize: {scheme: weight-only, granularity: per_group}"),
     ["stages[0].quantize.group_size: None must be a positive integer with granularity per_group"]),
    ("group-size-unused", stages("quantize: {scheme: weight-only, group_size: 32}"), ["stages[0].quantize.group_size: 32 is only used with granularity per_group"]),
    ("weight-qat-lsq-asymmetric", stages("quantize: {scheme: weight-qat, symmetric: false}"), ["stages[0].quantize.symmetric: false is not supported by method lsq"]),
    ("weight-qat-lr-zero", stages("quantize: {scheme: weight-qat, train: {lr: 0}}"), ["stages[0].quantize.train.lr: 0.0 must be > 0"]),
    ("codebook-bits-nine", stages("quantize: {scheme: codebook, bits: 9}"), ["stages[0].quantize.bits: 9 is outside 2..8"]),
    ("codebook-iters-negative", stages("quantize: {scheme: codebook, kmeans_iters: -1}"), ["stages[0].quantize.kmeans_iters: -1 must be an integer >= 0"]),
    ("codebook-power-of-two-finetune", stages("quantize: {scheme: codebook, method: power_of_two, train: {epochs: 2}}"),
     ["stages[0].quantize.train: fine-tuning with method power_of_two"]),
    ("codebook-flat-finetune-moved", stages("quantize: {scheme: codebook, finetune_epochs: 2}"),
     ["stages[0].quantize.finetune_epochs: moved to train.epochs; write train: {epochs: 2}"]),
    ("codebook-method-near-miss", stages("quantize: {scheme: codebook, method: kmeanz}"), ["stages[0].quantize.method: 'kmeanz' is not allowed"]),
    # --- export ----------------------------------------------------------------------------
    ("formats-unknown", stages("export: {formats: [tflite]}"), ["stages[0].export.formats[0]: 'tflite' is not allowed; choose one of 'pte', 'onnx', 'dsk'"]),
    ("formats-string", stages("export: {formats: pte}"), ["stages[0].export.formats: expected a list of 'pte' | 'onnx' | 'dsk', got 'pte'"]),
    ("formats-empty", stages("export: {formats: []}"), ["stages[0].export.formats: give at least one of 'pte', 'onnx', 'dsk'"]),
    ("parity-unknown", stages("export: {parity: maybe}"), ["stages[0].export.parity: 'maybe' is not allowed; choose one of 'fail', 'warn'"]),
    ("parity-samples-zero", stages("export: {parity_samples: 0}"), ["stages[0].export.parity_samples: 0 must be >= 1"]),
    ("dynamic-one-bound", stages("export: {dynamic: {x: {1: [2]}}}"), ["stages[0].export.dynamic.x.1: expected a list of 2: [int, int], got 1 values"]),
    ("dynamic-min-one", stages("export: {dynamic: {x: {1: [1, 8]}}}"), ["stages[0].export.dynamic.x.1: range [1, 8] must satisfy 2 <= min <= max"]),
    ("dynamic-min-above-max", stages("export: {dynamic: {x: {1: [9, 8]}}}"), ["stages[0].export.dynamic.x.1: range [9, 8] must satisfy 2 <= min <= max"]),
    ("dynamic-batch-dim", stages("export: {dynamic: {x: {0: [2, 8]}}}"), ["stages[0].export.dynamic.x.0: a dimension is a position >= 1"]),
    ("baseline-number", stages("export: {baseline: 1}"), ["stages[0].export.baseline: expected true or false, got 1"]),
    # --- evaluate, load, report ------------------------------------------------------------
    ("warmup-negative", stages("evaluate: {warmup: -5}"), ["stages[0].evaluate.warmup: -5 must be >= 0"]),
    ("threads-zero", stages("evaluate: {threads: 0}"), ["stages[0].evaluate.threads: 0 must be >= 1"]),
    ("latency-runs-negative", stages("evaluate: {latency_runs: -1}"), ["stages[0].evaluate.latency_runs: -1 must be >= 0"]),
    ("fidelity-near-miss", stages("evaluate: {fidelity: classificaton}"), ["stages[0].evaluate.fidelity: 'classificaton' is not allowed"]),
    ("metric-not-spec", stages("evaluate: {metric: mine}"), ["stages[0].evaluate.metric: 'mine' is not path/to/file.py:NAME"]),
    ("load-without-checkpoint", stages("load: {}"), ["stages[0].load.checkpoint: required key is missing"]),
    ("load-absent-checkpoint", stages("load: {checkpoint: absent.dsk}"), ["stages[0].load.checkpoint: absent.dsk does not exist"]),
    ("load-pickle", stages("load: {checkpoint: model.pt}"), ["stages[0].load.checkpoint: 'model.pt' is not a .safetensors, .dsk or .pt2 checkpoint"]),
    ("report-title-number", stages("evaluate: {}", "report: {title: 5}"), ["stages[1].report.title: expected a string, got 5"]),
    ("report-unknown-key", stages("evaluate: {}", "report: {format: pdf}"), ["stages[1].report.format: unknown key; allowed keys: title"]),
    # --- several faults, all reported ------------------------------------------------------
    ("three-in-one-stage", stages("train: {lr: 1e309, momentum: 2, weight_decay: -1}"),
     ["stages[0].train.lr: must be a finite number, got inf", "stages[0].train.momentum: 2.0 is outside [0, 1)",
      "stages[0].train.weight_decay: -1.0 must be >= 0"]),
    ("one-per-section", "name: t\nmodel: lenet5\ntarget: xnnpak\ndata: {name: mnistt, calib_size: -3}\nstages:\n"
     "  - train: {lr: .inf}\n  - prune: {method: magnitud}\n  - evaluate: {warmup: -5}\n  - trian: {}\n",
     ["recipe.data.calib_size: -3 must be >= 1", "recipe.data.name: 'mnistt' is not a dataset",
      "target: 'xnnpak' is not allowed", "model: 'lenet5' is not a zoo model", "stages[0].train.lr: must be a finite number",
      "stages[1].prune.method: 'magnitud' is not allowed", "stages[2].evaluate.warmup: -5 must be >= 0",
      "stages[3].trian: unknown stage"]),
    ("wrong-type-and-range-in-one-config", stages("prune: {method: magnitude, sparsity: 2, scope: all, batches: 3}"),
     ["stages[0].prune.batches: unknown key", "stages[0].prune.scope: 'all' is not allowed", "stages[0].prune.sparsity: 2.0 is outside [0, 1)"]),
    # --- the file itself -------------------------------------------------------------------
    ("billion-laughs", billion_laughs(), ["recipe: r.yaml line 6: anchors and aliases expand to more than 100,000 values"]),
    ("deep-flow-nesting", HEAD + "stages: " + "[" * 5000 + "]" * 5000 + "\n", [f"recipe: r.yaml line 4: nesting deeper than {MAX_DEPTH} levels"]),
    ("deep-block-nesting", "".join("  " * i + "a:\n" for i in range(100)), [f"recipe: r.yaml line 32: nesting deeper than {MAX_DEPTH} levels"]),
    ("deep-through-aliases", alias_chain(), [f"recipe: r.yaml line 3: nesting deeper than {MAX_DEPTH} levels once aliases are expanded"]),
    ("recursive-alias", "a: &a [*a]\n" + stages("train: {}"), ["recipe: r.yaml line 1: an alias refers to a node that contains it"]),
    ("duplicate-top-key", "name: a\nname: b\n" + stages("train: {}")[len("name: t\n"):],
     ["recipe: r.yaml line 2: key 'name' is given twice in one mapping (first at line 1)"]),
    ("duplicate-stage-key", stages("train: {epochs: 1, lr: 0.1, epochs: 2}"), ["recipe: r.yaml line 5: key 'epochs' is given twice in one mapping"]),
    ("duplicate-bool-key", stages("quantize: {scheme: int8-static, yes: 1, true: 2}"), ["recipe: r.yaml line 5: key True is given twice in one mapping"]),
    ("utf-16", stages("train: {}").encode("utf-16"), ["recipe: r.yaml is not UTF-8 text (it starts with a UTF-16 byte-order mark)"]),
    ("utf-16-no-bom", stages("train: {}").encode("utf-16-le"), ["recipe: r.yaml is not a text file (it contains NUL bytes)"]),
    ("utf-32", stages("train: {}").encode("utf-32"), ["recipe: r.yaml is not UTF-8 text (it starts with a UTF-32 byte-order mark)"]),
    ("binary", bytes(range(256)) * 4, ["recipe: r.yaml is not UTF-8 text (byte 0x80 at offset 128)"]),
    ("latin-1", "name: caf\u00e9\n".encode("latin-1") + stages("train: {}").encode()[len("name: t\n"):],
     ["recipe: r.yaml is not UTF-8 text (byte 0xe9 at offset 9)"]),
    ("too-large", stages("train: {}") + "#" * MAX_BYTES + "\n", ["recipe: r.yaml is 1.0 MiB; a recipe is at most 1 MiB of YAML"]),
    ("huge-integer", stages("train: {epochs: " + "9" * 5000 + "}"), ["recipe: r.yaml holds a value YAML cannot read: ValueError"]),
    ("python-object-tag", stages("train: !!python/object/apply:os.system ['echo pwned']"),
     ["recipe: r.yaml is not valid YAML at line 5, column 12: could not determine a constructor for the tag"]),
    ("unclosed-brace", stages("train: {epochs: 1"), ["recipe: r.yaml is not valid YAML at line"]),
    ("two-documents", stages("train: {}") + "---\n" + stages("train: {}"), ["recipe: r.yaml is not valid YAML at line 6, column 1: expected a single document in the stream but found another document"]),
    ("control-character", stages("train: {}") + "title: \x07\n", ["recipe: r.yaml is not valid YAML: character #x0007 at offset"]),
    ("empty-file", "", ["recipe: the file is empty"]),
    ("only-a-comment", "# nothing here\n", ["recipe: the file is empty"]),
    ("top-level-list", "- train: {}\n", ["recipe: expected a mapping with keys name, model, data, target, stages; got list"]),
    ("top-level-scalar", "hello\n", ["recipe: expected a mapping with keys name, model, data, target, stages; got str"]),
]

CLI_CASES = {"lr-inf-exponent", "momentum-nan", "weight-decay-negative", "image-size-negative", "image-size-zero",
             "calib-size-negative", "model-unknown", "data-unknown", "warmup-negative", "three-in-one-stage",
             "one-per-section", "billion-laughs", "deep-flow-nesting", "utf-16", "binary", "duplicate-top-key",
             "huge-integer", "python-object-tag", "recursive-alias", "too-large", "empty-file"}


def write(tmp_path, content) -> str:
    path = tmp_path / "r.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # messages name the file as given (r.yaml) and relative checkpoints are looked up here
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("content, expected", [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_bad_recipe_is_refused_naming_every_fault(tmp_path, content, expected):
    write(tmp_path, content)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_recipe("r.yaml")
    assert time.perf_counter() - started < 2.0      # refused, not expanded or trained
    err = caught.value
    assert type(err) is ConfigError
    assert len(err.problems) == len(expected), err.problems
    for want in expected:
        assert any(p.startswith(want) for p in err.problems), (want, err.problems)
    assert "\n" not in str(err)
    if len(expected) > 1:
        assert str(err) == f"{len(expected)} problems: " + "; ".join(err.problems)


@pytest.mark.parametrize("content, expected", [pytest.param(c, e, id=i) for i, c, e in CASES if i in CLI_CASES])
def test_bad_recipe_through_the_cli_is_one_line_and_exit_2(tmp_path, capsys, content, expected):
    write(tmp_path, content)
    assert main(["validate", "r.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deepshrink: error: ")
    for want in expected:
        assert want in lines[0]


def test_corpus_is_large_and_every_cli_case_exists():
    ids = [i for i, _, _ in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 80
    assert CLI_CASES <= set(ids)


@pytest.mark.parametrize("near_miss, suggestion", [
    ("modle: x", "recipe.modle: unknown key; allowed keys: name, model, model_args, data, target, seed, outputs, objective, stages; did you mean 'model'?"),
    ("model: lenet5", "did you mean 'lenet-5'?"),
    ("target: xnnpak", "did you mean 'xnnpack'?"),
    ("data: {name: mnistt}", "did you mean 'mnist'?"),
])
def test_near_misses_get_a_suggestion(tmp_path, near_miss, suggestion):
    write(tmp_path, top("name: t\n" + near_miss))
    with pytest.raises(ConfigError) as caught:
        load_recipe("r.yaml")
    assert caught.value.problems[0].endswith(suggestion)


@pytest.mark.parametrize("stage, suggestion", [
    ("trian: {}", "did you mean 'train'?"),
    ("prune: {method: magnitud}", "did you mean 'magnitude'?"),
    ("quantize: {scheme: int8-statik}", "did you mean 'int8-static'?"),
    ("train: {optimiser: sgd}", "did you mean 'optimizer'?"),
    ("evaluate: {fidelity: classificaton}", "did you mean 'classification'?"),
    ("prune: {method: magnitude, schedule: {iterativ: {}}, retrain: {}}", "did you mean 'iterative'?"),
])
def test_near_miss_names_in_stages_get_a_suggestion(tmp_path, stage, suggestion):
    write(tmp_path, stages(stage))
    with pytest.raises(ConfigError) as caught:
        load_recipe("r.yaml")
    assert caught.value.problems[0].endswith(suggestion)


def test_the_strict_reader_still_reads_what_recipes_use(tmp_path):
    text = ("\ufeffname: shared\nmodel: lenet-5\nstages:\n"
            "  - train: &ft {epochs: 2, lr: 1e-3}\n"
            "  - prune: {method: magnitude, sparsity: 0.8, retrain: *ft}\n"
            "  - finetune: {<<: *ft, lr: 5e-4}\n")
    write(tmp_path, text)
    recipe = load_recipe("r.yaml")
    train, prune, finetune = (s.config for s in recipe.stages)
    assert train.lr == 1e-3 and isinstance(train.lr, float)            # YAML 1.2: 1e-3 is a number
    assert prune.retrain == train                                       # an alias shares a block
    assert finetune.epochs == 2 and finetune.lr == 5e-4                 # a merge key may be overridden


def test_too_many_values_without_aliases_is_refused_as_such(tmp_path, monkeypatch):
    from deepshrink.pipeline import recipe_file

    monkeypatch.setattr(recipe_file, "MAX_NODES", 50)
    write(tmp_path, stages("prune: {method: magnitude, overrides: {" + ", ".join(f"l{i}: 0.5" for i in range(40)) + "}}"))
    with pytest.raises(ConfigError, match=r"^recipe: r\.yaml line \d+: holds more than 50 values; a recipe needs a few hundred$"):
        load_recipe("r.yaml")
