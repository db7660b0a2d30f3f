"""Training precisions: which ones Algorithm 1 can run, and whether bf16 pays on this CPU."""

from __future__ import annotations

import platform
from pathlib import Path

# float32 weights throughout; bf16-mixed computes in bf16 (autocast) and keeps float32 weights and optimizer
# state
SUPPORTED_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed", "bf16")
# x86: native bf16 dot products / tiles (Linux /proc/cpuinfo flags)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def precision_error(precision: object) -> str | None:
    """The one-line refusal for a Lightning precision this project cannot train with, or None."""
    text = str(precision)
    if text in SUPPORTED_PRECISIONS:
        return None
    if text in ("16-mixed", "16"):
        return ("--trainer.precision 16-mixed (float16 with loss scaling) is not supported: Algorithm 1 steps"
                " its optimizers itself, outside Lightning's gradient scaler; use --trainer.precision"
                " bf16-mixed (GPUs with bf16, e.g. NVIDIA Ampere or newer) or 32-true")
    if text in ("16-true", "bf16-true"):
        return (f"--trainer.precision {text} keeps the weights in 16 bits, where the EMA (rate 0.001) and"
                " target (rate 0.005) updates round away:"
                " use bf16-mixed (bf16 compute, float32 weights) or 32-true")
    return (f"--trainer.precision {text} is not supported: use 32-true, or bf16-mixed on hardware with native"
            " bf16 (GPUs; CPUs with AVX512_BF16 or AMX)")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bf16 matrix products natively: x86 ``avx512_bf16`` or ``amx_bf16``, Arm
    ``bf16`` (from ``/proc/cpuinfo``, or the given text). None where that cannot be read (not Linux). Without
    it, bf16 matmuls are emulated: on an AVX2-only AMD EPYC they ran 209x slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            words.update(value.split())
    if not words:
        return None
    return any(flag in words for flag in (*BF16_CPU_FLAGS, "bf16"))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def slow_bf16_note(what: str, cpuinfo: str | None = None) -> str | None:
    """One line for a run that asks for bf16 (``what``: which option) on a CPU without native bf16, else
    None."""
    if cpu_has_native_bf16(cpuinfo) is not False:
        return None
    return (f"[idql_pl] {what} on this CPU ({cpu_model()}), which has no native bf16 (AVX512_BF16, AMX or Arm"
            " BF16): bf16 matrix products are emulated and can run many times slower than float32;"
            " use 32-true")
