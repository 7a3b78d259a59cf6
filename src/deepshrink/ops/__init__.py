"""Pure tensor math: masks, quantization primitives, codecs. Imports torch and core only."""
