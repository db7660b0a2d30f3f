"""The training process's large CPU tensors come from glibc's reused heap (``idql_pl.runtime``): the effect on
a real allocation in a fresh process, and the user's own glibc settings kept (the CLI's ``[idql_pl] memory:``
line: ``tests/integration/test_threads.py``). No timings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from idql_pl import runtime

GLIBC = runtime._glibc_mallopt() is not None

# a fresh process: glibc's count of mmapped blocks (mallinfo2().hblks) while a 64 MiB tensor is alive, with
# glibc's defaults and after reuse_large_blocks
PROBE = """
import ctypes, torch
from idql_pl.runtime import reuse_large_blocks
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mmapped_while_alive():
    x = torch.empty(16 * 2**20)  # 64 MiB of float32
    n = libc.mallinfo2().hblks
    del x
    return n
before = mmapped_while_alive()
said = reuse_large_blocks({})
print(before, mmapped_while_alive(), said)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_large_tensors_come_from_the_heap_after_reuse_large_blocks():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after, *said = proc.stdout.split()
    assert int(before) >= 1  # glibc's default: the 64 MiB block is a fresh mmap
    assert int(after) == int(before) - 1  # now it is heap memory, reused after the free
    assert " ".join(said) == "glibc malloc: large blocks from the heap, reused"


def test_the_users_own_glibc_settings_are_kept(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "_glibc_mallopt", lambda: lambda *a: calls.append(a) or 1)
    assert (runtime.reuse_large_blocks({"MALLOC_MMAP_MAX_": "65536"})
            == "glibc malloc as set by MALLOC_MMAP_MAX_")
    assert calls == []
    assert runtime.reuse_large_blocks({}) == "glibc malloc: large blocks from the heap, reused"
    assert calls == [(runtime.M_MMAP_MAX, 0), (runtime.M_TRIM_THRESHOLD, runtime.TRIM_THRESHOLD)]
    calls.clear()
    assert (runtime.reuse_large_blocks({"IDQL_PL_TWEAKS_OFF": "malloc"})
            == "glibc malloc defaults (IDQL_PL_TWEAKS_OFF)")
    assert calls == []  # switched off


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(runtime, "_glibc_mallopt", lambda: None)
    assert runtime.reuse_large_blocks({}) == "the platform's malloc (not glibc)"
