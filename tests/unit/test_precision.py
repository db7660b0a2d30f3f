"""Training precisions: float16 with loss scaling and 16-bit weights are refused in one line; a bf16 run on a
CPU without native bf16 says so at start."""

from __future__ import annotations

import pytest

from idql_pl.training import precision

AVX2_EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx avx2 fma f16c\n"
GENOA = "model name\t: AMD EPYC 9654\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                   "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n")
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\n"


@pytest.mark.parametrize(("cpuinfo", "native"), [(AVX2_EPYC, False), (GENOA, True), (SAPPHIRE_RAPIDS, True),
                                                 (GRAVITON3, True), ("", None)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo: str, native: bool | None) -> None:
    assert precision.cpu_has_native_bf16(cpuinfo) is native
    note = precision.slow_bf16_note("--trainer.precision bf16-mixed", cpuinfo)
    assert (note is not None) == (native is False)


def test_supported_and_refused_precisions() -> None:
    for ok in ("32-true", "32", "bf16-mixed", "64-true"):
        assert precision.precision_error(ok) is None
    assert "bf16-mixed" in precision.precision_error("16-mixed")
    assert "round away" in precision.precision_error("16-true")
    assert "not supported" in precision.precision_error("transformer-engine")




