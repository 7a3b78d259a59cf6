"""Plots as inline PNG data URIs (matplotlib, imported only here)."""
from __future__ import annotations

import base64
import io

from deepshrink.core.extras import require


def _figure(figsize: tuple[float, float]):
    # a bare Figure renders with Agg on savefig: no pyplot, so no global backend switch and no
    # figure registry to close (the user's own plots and backend stay as they were)
    require("matplotlib")
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def png_data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def accuracy_vs_size(variants: dict[str, dict]) -> str | None:
    """Accuracy (in its runtime) against file size for every variant that is a file."""
    def score(v: dict):
        if v.get("accuracy") is not None:
            return 100 * v["accuracy"]
        return 100 * v["fidelity"]["value"] if v.get("fidelity") and v["fidelity"]["kind"] != "tensor" else None

    points = [(label, v["file_bytes"] / 1024, score(v)) for label, v in variants.items()
              if v.get("file_bytes") and score(v) is not None]
    if not points:
        return None
    fig = _figure((6, 3.6))
    ax = fig.subplots()
    markers = {".pte": "s", ".onnx": "^"}
    for label, size_kib, acc in points:
        marker = next((m for suffix, m in markers.items() if label.endswith(suffix)), "o")
        # variants often coincide (same accuracy, near sizes): a legend stays readable, labels overlap
        ax.scatter(size_kib, acc, marker=marker, s=60, alpha=0.8, label=label)
    ax.legend(fontsize=8, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel("file size (KiB, log scale)")
    labelled = any(v.get("accuracy") is not None for v in variants.values())
    ax.set_ylabel("test accuracy in runtime (%)" if labelled else "fidelity to fp32 in runtime (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title("Accuracy against size")
    return png_data_uri(fig)


def sensitivity_curves(curves: dict, proposed: dict[str, float]) -> str:
    """Val accuracy against sparsity, one line per layer pruned alone; the proposal marked."""
    fig = _figure((6, 3.6))
    ax = fig.subplots()
    for layer, points in curves["accuracy"].items():
        xs = [0.0] + [float(s) for s in points]
        ys = [100 * curves["baseline"]] + [100 * a for a in points.values()]
        line, = ax.plot([100 * x for x in xs], ys, marker=".", label=f"{layer} ({curves['sizes'][layer]:,} w)")
        if layer in proposed:
            ax.axvline(100 * proposed[layer], color=line.get_color(), linestyle=":", alpha=0.7)
    ax.set_xlabel("sparsity of that layer alone (%); dotted: proposed")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Per-layer pruning sensitivity")
    return png_data_uri(fig)
