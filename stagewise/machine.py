"""The machine a speed figure was measured on.

A tokens/s ratio says little without it: on a CPU with AVX-512-BF16 (current Xeon and EPYC servers)
bitsandbytes' NF4 kernel repacks weights for a fast path, and a chain such as `distill+nf4` that is
0.84x its parent elsewhere runs at 1.06x (issue 22). So every speed figure carries `describe()`: the
CPU model, the flags that change which kernels run, the thread count and the GPU if any. Two figures
are comparable when their `kind` is the same (threads are recorded, not part of the kind: they are a
setting, `run.threads`).
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

# CPU flags that select different kernels in torch / bitsandbytes / oneDNN (from /proc/cpuinfo)
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo(text: str) -> tuple[str, set[str]]:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def describe(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """{cpu, flags: {flag: bool}, threads, gpu, kind} of this process's machine."""
    import torch

    try:
        model, flags = _cpuinfo(cpuinfo.read_text())
    except OSError:   # not Linux: the platform's own name, no flags
        model, flags = "", set()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    m = {"cpu": model or platform.processor() or platform.machine(),
         "flags": {f: f in flags for f in KERNEL_FLAGS}, "threads": torch.get_num_threads(), "gpu": gpu}
    return m | {"kind": kind(m)}


def kind(m: dict[str, Any]) -> str:
    """Short id of what makes speeds comparable: CPU model, kernel flags, GPU."""
    key = "|".join([m.get("cpu") or "", ",".join(f for f, on in sorted((m.get("flags") or {}).items()) if on),
                    m.get("gpu") or ""])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def label(m: dict[str, Any] | None) -> str:
    """One line for reports: `AMD EPYC 7B13 (avx512_bf16, avx512f), 2 threads, no GPU`."""
    if not m:
        return "an unrecorded machine"
    on = [f for f in KERNEL_FLAGS if (m.get("flags") or {}).get(f)]
    return (f"{m.get('cpu') or 'unknown CPU'} ({', '.join(on) if on else 'no ' + '/'.join(KERNEL_FLAGS[1:])}), "
            f"{m.get('threads')} thread(s), {m.get('gpu') or 'no GPU'}")


def tags(m: dict[str, Any] | None) -> dict[str, str]:
    """Registry tags of a version whose speed was measured on `m`."""
    if not m:
        return {}
    return {"speed_machine": label(m), "speed_machine_kind": m.get("kind") or kind(m)}


def elsewhere(measured_kind: str | None, here: dict[str, Any] | None = None) -> bool:
    """Was a figure tagged `measured_kind` measured on another kind of machine than this one?
    (No tag: recorded before machines were, so unknown — flagged too.)"""
    here = here or describe()
    return measured_kind != (here.get("kind") or kind(here))
