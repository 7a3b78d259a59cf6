"""Int8 layouts: what each target runs, and one layout for a recipe that exports to both runtimes."""
import pytest

from deepshrink.core.errors import ConfigError
from deepshrink.core.targets import (
    GUARDED_LAYOUTS, INT8_LAYOUTS, SATURATION_SAFE_LAYOUTS, XNNPACK_LAYOUTS, common_int8_layout, get_target, layout_ranges,
)
from deepshrink.ops.int_kernels import INT16_MAX, max_pair_sum


def test_layout_ranges():
    assert layout_ranges("s8s8") == {"activation_dtype": "int8", "weight_dtype": "int8", "weight_qmin": -127, "weight_qmax": 127}
    assert layout_ranges("u8s8-reduced") == {"activation_dtype": "uint8", "weight_dtype": "int8", "weight_qmin": -63, "weight_qmax": 63}
    assert layout_ranges("u8u8")["weight_dtype"] == "uint8"
    with pytest.raises(ConfigError, match="int8_layout: 's7s7' is not one of s8s8, s8s8-reduced"):
        layout_ranges("s7s7")


def test_the_safe_layouts_are_exactly_those_whose_pairs_fit_int16():
    for layout in INT8_LAYOUTS:
        r = layout_ranges(layout)
        fits = r["weight_dtype"] == "uint8" or max_pair_sum(255, r["weight_qmax"]) <= INT16_MAX
        assert (layout in SATURATION_SAFE_LAYOUTS) == fits
        # a guarded layout starts at full range; quantize narrows the channels that need it
        assert (layout in GUARDED_LAYOUTS) == (layout.endswith("-guarded") and not fits)


def test_target_defaults_and_the_layout_shared_by_both_runtimes():
    xnnpack, ort = get_target("xnnpack"), get_target("onnxruntime")
    assert xnnpack.quantizer.int8_layout == "s8s8" and ort.quantizer.int8_layout == "u8s8-guarded"
    assert common_int8_layout(("pte",), xnnpack) == "s8s8"
    assert common_int8_layout(("onnx",), ort) == "u8s8-guarded"
    assert common_int8_layout(("onnx",), xnnpack) == "u8s8-guarded"       # the file ORT runs decides
    both = common_int8_layout(("pte", "onnx"), xnnpack)
    assert both == common_int8_layout(("onnx", "pte"), ort) == "s8s8-guarded"
    assert both in XNNPACK_LAYOUTS and both in GUARDED_LAYOUTS
