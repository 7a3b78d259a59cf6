"""Plots as inline PNG data URIs (matplotlib, imported only here)."""
from __future__ import annotations

import base64
import io


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def accuracy_vs_size(variants: dict[str, dict]) -> str | None:
    """Accuracy (in its runtime) against file size for every variant that is a file."""
    points = [(label, v["file_bytes"] / 1024, 100 * v["accuracy"]) for label, v in variants.items() if v.get("file_bytes")]
    if not points:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    markers = {".pte": "s", ".onnx": "^"}
    for label, size_kib, acc in points:
        marker = next((m for suffix, m in markers.items() if label.endswith(suffix)), "o")
        # variants often coincide (same accuracy, near sizes): a legend stays readable, labels overlap
        ax.scatter(size_kib, acc, marker=marker, s=60, alpha=0.8, label=label)
    ax.legend(fontsize=8, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("file size (KiB, log scale)")
    ax.set_ylabel("test accuracy in runtime (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title("Accuracy against size")
    return png_data_uri(fig)
