"""Run as a CPU with fewer instructions would: `WAVEGLOW_ISA_CAP`, for testing one machine's code paths
on another (the suite on an Intel CPU with AMX, as an AMD EPYC without AMX runs it).

A cap does three things, all before the first GEMM (oneDNN and MKL read their variables then, not at
import): it caps oneDNN's ISA (`ONEDNN_MAX_CPU_ISA`: bf16/int8 kernels, AMX), MKL's (`MKL_ENABLE_INSTRUCTIONS`:
the fp32 GEMMs; on a non-Intel CPU MKL takes its AVX2 path whatever the CPU has, which is what `no_amx`
copies), and the CPU flags the project's own dispatch reads (`hardware.cpu_flags`). A variable the user set
is left as it is. No torch import here: the package applies the cap when it is imported.
"""
from __future__ import annotations

import os

ENV = "WAVEGLOW_ISA_CAP"

#: cap → (oneDNN's max ISA, MKL's instructions, flag prefixes the CPU is taken not to have)
ISA_CAPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # AMD EPYC (Zen 4): AVX-512 with BF16 and VNNI, no AMX; MKL on its non-Intel (AVX2) path
    "no_amx": ("AVX512_CORE_BF16", "AVX2", ("amx",)),
    # a CPU without AVX-512 (older Intel, Zen 2/3): AVX2 only, no VNNI
    "avx2": ("AVX2", "AVX2", ("amx", "avx512", "avx_vnni")),
}


def isa_cap() -> str | None:
    """The cap in force (`WAVEGLOW_ISA_CAP`), or None; an unknown name is an error, not ignored."""
    name = os.environ.get(ENV, "").strip().lower()
    if not name or name == "none":
        return None
    if name not in ISA_CAPS:
        raise ValueError(f"{ENV}={name!r}: expected one of {', '.join(ISA_CAPS)} (or unset)")
    return name


def apply_isa_cap() -> str | None:
    """Set oneDNN's and MKL's caps for the cap in force (unless the user set them); returns the cap."""
    name = isa_cap()
    if name is not None:
        onednn, mkl, _ = ISA_CAPS[name]
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", onednn)
        os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", mkl)
    return name


def capped_flags(flags: set[str]) -> set[str]:
    """`flags` without what the cap in force takes away."""
    name = isa_cap()
    if name is None:
        return flags
    removed = ISA_CAPS[name][2]
    return {flag for flag in flags if not flag.startswith(removed)}
