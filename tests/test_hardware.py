"""`--precision auto`'s choice per processor, and the CPU facts it rests on."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from charlm.devices import hardware

ZEN4_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS_FLAGS = "sse2 avx2 fma avx512f avx512_fp16 amx_bf16 amx_tile amx_int8"
ZEN3_FLAGS = "fpu sse2 avx avx2 fma"


def cpuinfo(tmp_path: Path, flags: str, key: str = "flags") -> Path:
    path = tmp_path / "cpuinfo"
    processor = f"processor\t: {{n}}\nmodel name\t: AMD EPYC 9R14\n{key}\t\t: {flags}\n\n"
    path.write_text(processor.format(n=0) + processor.format(n=1))
    return path


def test_cpu_info_reads_the_model_name_and_flags(tmp_path: Path):
    name, flags = hardware.cpu_info(cpuinfo(tmp_path, ZEN4_FLAGS))
    assert name == "AMD EPYC 9R14"
    assert {"avx2", "avx512f", "avx512_bf16"} <= flags and "amx_bf16" not in flags
    arm = hardware.cpu_info(cpuinfo(tmp_path, "fp asimd sve bf16", key="Features"))[1]
    assert "bf16" in arm


def test_cpu_info_without_a_cpuinfo_file_has_no_flags(tmp_path: Path):
    name, flags = hardware.cpu_info(tmp_path / "missing")
    assert name and flags == frozenset()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (ZEN4_FLAGS, ("bfloat16", "the CPU has avx512_bf16")),
        (SAPPHIRE_RAPIDS_FLAGS, ("bfloat16", "the CPU has amx_bf16")),
        (ZEN3_FLAGS, ("float32", "the CPU lacks bfloat16 arithmetic")),
        # ARM's BF16 extension: XLA's CPU matmuls do not use it, so float32 stays faster.
        ("fp asimd sve bf16", ("float32", "the CPU lacks bfloat16 arithmetic")),
    ],
)
def test_auto_precision_on_cpus(flags: str, expected: tuple[str, str]):
    cpu = SimpleNamespace(platform="cpu")
    assert hardware.auto_precision(cpu, frozenset(flags.split())) == expected


@pytest.mark.parametrize(
    ("device", "precision"),
    [
        (SimpleNamespace(platform="gpu", compute_capability="9.0"), "bfloat16"),
        (SimpleNamespace(platform="gpu", compute_capability="8.0"), "bfloat16"),
        (SimpleNamespace(platform="gpu", compute_capability="7.5"), "float32"),
        (SimpleNamespace(platform="tpu"), "bfloat16"),
    ],
)
def test_auto_precision_on_accelerators(device: SimpleNamespace, precision: str):
    chosen, reason = hardware.auto_precision(device, frozenset())
    assert chosen == precision and reason


def test_describe_cpu_names_the_vector_extensions(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hardware, "cpu_info", lambda: ("AMD EPYC", frozenset(ZEN4_FLAGS.split())))
    description = hardware.describe_cpu()
    assert description.startswith("AMD EPYC, ")
    assert "(avx2, fma, avx512f, avx512_bf16)" in description
