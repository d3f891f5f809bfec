"""Which precision a run uses: `--dtype auto` resolved from the device kind and, on a CPU, its instruction set.

Torch-free and pure (the CPU's flags are an argument), so the choice is testable for any machine and
`osediff sr --dry-run` can say what it picked and why. `osediff.core.pipeline.resolve_dtypes` maps the result
to torch dtypes and reads the flags of the machine it runs on.

Why these choices (numbers in benchmarks/RESULTS.md, full-size SD 2.1-base with random weights, 512²):
- CUDA / MPS: fp16, the reference's precision (spec §1.11).
- CPU with native bf16 (AVX512-BF16 or AMX-BF16): bf16, 1.97–2.26× faster than fp32 and the smallest
  (the UNet in fp32 alone is 3.5 GB). `vae-bf16` is closer to fp32 (41 dB against 36 dB PSNR on random
  weights) but keeps the UNet and text encoder in fp32, so it is ~10 % slower and needs > 5 GB; ask for it.
- CPU without native bf16: fp32. There bf16 is emulated in software: measured 3.5× *slower* than fp32 on an
  AVX-512 Xeon without AVX512-BF16 (72 s against 21 s per 512² image).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# values of `--dtype`; "auto" is resolved by `choose_dtype`
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16", "vae-bf16")

# /proc/cpuinfo names of the x86 extensions that compute bf16 dot products in hardware (oneDNN uses them for
# bf16 convolutions and matmuls); without one of them bf16 runs through fp32 conversions on every op.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved `--dtype`: `name` is one of DTYPE_CHOICES other than "auto"; `reason` is for logs and
    `--dry-run`; `emulated_bf16` is True when bf16 was asked for on a CPU that lacks native bf16."""

    name: str
    reason: str
    emulated_bf16: bool = False

    @property
    def warning(self) -> str | None:
        if not self.emulated_bf16:
            return None
        return (f"--dtype {self.name} on a CPU without native bf16 (no {' / '.join(NATIVE_BF16_FLAGS)}): bf16 is "
                "emulated there and runs several times slower than fp32 (3.5× measured on an AVX-512 Xeon); "
                "--dtype auto or fp32 is faster")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of a /proc/cpuinfo text (x86 "flags" lines, ARM "Features" lines), lower case."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.lower().split())
    return frozenset(flags)


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """This machine's CPU flags from /proc/cpuinfo, or None where there is no such file (macOS, Windows)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    flags = parse_cpu_flags(text)
    return flags or None


def native_bf16(flags: Iterable[str]) -> list[str]:
    """The native-bf16 flags present in `flags` (empty: bf16 would be emulated)."""
    have = set(flags)
    return [f for f in NATIVE_BF16_FLAGS if f in have]


def choose_dtype(requested: str | None, device_type: str, cpu_flags: Iterable[str] | None = None) -> DtypeChoice:
    """Resolve a `--dtype` value (None = "auto") for a device kind ("cuda", "mps", "cpu").

    `cpu_flags` matters on the CPU only: the flags of `read_cpu_flags` (or an equivalent set), None when
    unknown, in which case auto picks fp32 (always correct, never the slow emulated path).
    """
    if requested is not None and requested not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    on_cpu = device_type == "cpu"
    native = native_bf16(cpu_flags) if (on_cpu and cpu_flags is not None) else []
    if requested not in (None, "auto"):
        emulated = on_cpu and "bf16" in requested and not native
        where = f"native: {', '.join(native)}" if native else "bf16 emulated" if emulated else device_type
        return DtypeChoice(requested, f"--dtype {requested} as asked ({where})", emulated)
    if device_type in ("cuda", "mps"):
        return DtypeChoice("fp16", f"auto on {device_type}: fp16, the reference's precision")
    if not on_cpu:
        return DtypeChoice("fp32", f"auto on {device_type}: fp32")
    if cpu_flags is None:
        return DtypeChoice("fp32", "auto on cpu: CPU features unknown, fp32 (bf16 is slow where it is emulated)")
    if native:
        return DtypeChoice("bf16", f"auto on cpu: native bf16 ({', '.join(native)}), bf16 is ~2× faster than fp32")
    return DtypeChoice("fp32", "auto on cpu: no native bf16 (no AVX512-BF16 / AMX-BF16), fp32 is faster than "
                               "emulated bf16")
