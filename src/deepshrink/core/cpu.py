"""The machine, measured: CPU model and the ISA features that change int8 numerics and speed.

Nothing here is assumed. ``cpu_info()`` reads the kernel's own record (``/proc/cpuinfo``, the
same ``flags`` / ``Features`` that ``lscpu`` prints); every report, table and caveat is derived
from what it found. Int8 kernels differ by feature:

- x86 without VNNI: u8 x s8 dot products go through ``vpmaddubsw``, which sums two products
  into a *saturating* int16 — a full-range int8 ONNX file can be wrong there (see
  ``quantization/saturation.py``); VNNI (``vpdpbusd``) accumulates in int32 and cannot.
- AVX-512 / AMX make int8 gains look larger than on phones.
- ARM: ``asimddp`` (dotprod, ``sdot``/``udot``) and ``i8mm`` are the phone's int8 engines.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# (feature name we report, flag names in /proc/cpuinfo that mean it)
X86_FEATURES = (
    ("AVX2", ("avx2",)),
    ("AVX-512", ("avx512f",)),
    ("AVX-512 VNNI", ("avx512_vnni",)),
    ("AVX-VNNI", ("avx_vnni",)),
    ("AMX-INT8", ("amx_int8",)),
)
ARM_FEATURES = (
    ("NEON", ("asimd", "neon")),
    ("dotprod", ("asimddp",)),
    ("i8mm", ("i8mm",)),
)
VNNI = ("AVX-512 VNNI", "AVX-VNNI", "AMX-INT8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str                      # "x86_64", "aarch64", ...
    features: tuple[str, ...]      # the names of X86_FEATURES / ARM_FEATURES found

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i686", "i386")

    @property
    def has_vnni(self) -> bool:
        """An int32-accumulating u8 x s8 dot product (VNNI or AMX): ORT's int8 kernels cannot saturate."""
        return any(f in self.features for f in VNNI)

    @property
    def int8_pairs_saturate(self) -> bool:
        """True where ONNX Runtime's u8 x s8 GEMM sums product pairs in a saturating int16 (x86 without VNNI)."""
        return self.is_x86 and not self.has_vnni

    def describe(self) -> str:
        """One line for reports and tables: ``AMD EPYC (x86_64; AVX2, AVX-512, AVX-512 VNNI)``."""
        return f"{self.model} ({self.arch}; {', '.join(self.features) or 'no int8-relevant ISA features found'})"

    def int8_caveat(self) -> str:
        """What this CPU's features mean for int8 numbers measured on it, derived from the features."""
        found = ", ".join(self.features) or "none of the int8-relevant features"
        if not self.is_x86:
            dot = "has" if "dotprod" in self.features else "lacks"
            return (f"This {self.arch} CPU ({found}) {dot} the dotprod int8 instructions; "
                    "latencies transfer to phones of the same core generation.")
        parts = [f"This x86 CPU reports {found}."]
        if self.has_vnni:
            wide = " and AMX" if "AMX-INT8" in self.features else ""
            parts.append(f"Its VNNI{wide} int8 instructions make int8 speed-ups here overstate ARM phones.")
        else:
            parts.append("Without VNNI, ONNX Runtime's u8 x s8 kernels sum product pairs in a saturating int16: "
                         "full-range int8 weights can give wrong outputs here (deepshrink's ONNX profiles use 7-bit "
                         "weights or u8/u8 to avoid it), and int8 gains are smaller than on VNNI CPUs.")
        if "AVX-512" in self.features:
            parts.append("AVX-512 makes fp32 and int8 kernels faster than a phone's NEON.")
        parts.append("Ratios measured in one run (interleaved) transfer; milliseconds do not.")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return {"model": self.model, "arch": self.arch, "features": list(self.features),
                "int8_pairs_saturate": self.int8_pairs_saturate}


def parse_cpuinfo(text: str, arch: str) -> CpuInfo:
    """``CpuInfo`` from the text of ``/proc/cpuinfo`` (first processor's model and flags)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    table = ARM_FEATURES if arch in ("aarch64", "arm64") or arch.startswith("arm") else X86_FEATURES
    features = tuple(name for name, aliases in table if flags & set(aliases))
    return CpuInfo(model=model or platform.processor() or arch, arch=arch, features=features)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU, read once per process."""
    arch = platform.machine() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, arch)
