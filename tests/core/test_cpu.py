"""The machine is read, never assumed: features come from /proc/cpuinfo, caveats from features."""
from pathlib import Path

from deepshrink.core.cpu import cpu_info, parse_cpuinfo

AVX2_ONLY = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 ssse3 fma avx avx2 bmi2\n"
VNNI = "model name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: avx2 avx512f avx512_vnni amx_tile amx_int8\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp i8mm\nCPU part\t: 0xd0c\n"


def test_avx2_only_machine_is_one_where_int8_pairs_saturate():
    info = parse_cpuinfo(AVX2_ONLY, "x86_64")
    assert info.model == "AMD EPYC" and info.features == ("AVX2",)
    assert not info.has_vnni and info.int8_pairs_saturate
    caveat = info.int8_caveat()
    assert "saturating int16" in caveat and "VNNI int8 instructions" not in caveat and "AMX" not in caveat


def test_vnni_and_amx_are_named_only_when_present():
    info = parse_cpuinfo(VNNI, "x86_64")
    assert info.features == ("AVX2", "AVX-512", "AVX-512 VNNI", "AMX-INT8")
    assert info.has_vnni and not info.int8_pairs_saturate
    assert "VNNI and AMX int8 instructions" in info.int8_caveat() and "saturating" not in info.int8_caveat()
    assert info.describe() == "Intel(R) Xeon(R) Platinum (x86_64; AVX2, AVX-512, AVX-512 VNNI, AMX-INT8)"


def test_arm_dotprod_is_read_from_features():
    info = parse_cpuinfo(ARM, "aarch64")
    assert info.features == ("NEON", "dotprod", "i8mm")
    assert not info.int8_pairs_saturate and "has the dotprod" in info.int8_caveat()


def test_this_machine_matches_its_own_flags_line():
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split(":")[1].split()
    info = cpu_info()
    assert ("AVX2" in info.features) == ("avx2" in flags)
    assert ("AVX-512 VNNI" in info.features) == ("avx512_vnni" in flags)
    assert ("AMX-INT8" in info.features) == ("amx_int8" in flags)
    assert info.int8_pairs_saturate == (not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")))
