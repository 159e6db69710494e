"""stagewise/machine.py: the machine every speed figure records, and when two are not comparable."""

from __future__ import annotations

from stagewise import machine

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512vl
"""
OLD_XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
flags\t\t: fpu sse avx2 avx512f
"""


def test_describe_reads_the_cpu_model_and_the_kernel_changing_flags(tmp_path):
    (tmp_path / "epyc").write_text(EPYC)
    m = machine.describe(tmp_path / "epyc")
    assert m["cpu"] == "AMD EPYC 9B14"
    assert m["flags"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}
    assert m["threads"] >= 1 and "gpu" in m and m["kind"] == machine.kind(m)
    assert machine.label(m).startswith("AMD EPYC 9B14 (avx2, avx512f, avx512_bf16), ")


def test_bf16_kernels_make_another_machine_kind_and_threads_do_not(tmp_path):
    (tmp_path / "epyc").write_text(EPYC)
    (tmp_path / "xeon").write_text(OLD_XEON)
    epyc, xeon = machine.describe(tmp_path / "epyc"), machine.describe(tmp_path / "xeon")
    assert epyc["kind"] != xeon["kind"]
    assert machine.elsewhere(epyc["kind"], xeon) and not machine.elsewhere(epyc["kind"], epyc)
    assert machine.kind(epyc | {"threads": 64}) == epyc["kind"]
    assert machine.elsewhere(None, epyc)   # a figure recorded before machines were: not known to be comparable
    tags = machine.tags(epyc)
    assert tags == {"speed_machine": machine.label(epyc), "speed_machine_kind": epyc["kind"]}
    assert machine.tags(None) == {}


def test_this_machine_is_described():
    m = machine.describe()
    assert m["cpu"] and set(m["flags"]) == set(machine.KERNEL_FLAGS)
