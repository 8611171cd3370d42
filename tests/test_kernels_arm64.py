"""The C runtime on ARM64: cross-compiled (Debian's gcc-aarch64-linux-gnu, and clang where there
is one) and run under qemu's user mode (qemu-user), against this machine's x86-64 build.

tests/kernels_driver.c, built with ggml_cpu.c once for this machine and once for ARM64, makes
the same inputs on both (blocks of every type, activations, a tiny random LLaMA), runs them on
every kernel path its CPU has and prints the results; qemu runs the ARM64 build as three CPUs:
`max` (dot products and i8mm: the scalar, neon and i8mm paths), `neoverse-n1` (dot products
only) and `cortex-a53` (neither: the scalar path alone). Bounds (the x86-64 paths' own):
- the activation quantization, and every product of the raw-block kernels on quantized types
  (the scalar path), equal x86-64's bit for bit (F16/F32 rows: float dots summed in another
  vector order by the compiler, < 1e-5 relative, as the x86 paths among themselves);
- every packed product and gated pair of the neon and i8mm kernels equals AVX512's (or AVX2's)
  bit for bit, as AVX2's does (tests/test_kernel_paths.py);
- the whole network: the same bits on 1 and 2 threads and on neon and i8mm; against x86-64's
  network on the matching path (scalar against scalar, neon/i8mm against AVX512/AVX2)
  < 5e-4 max|logits| (libm's exp/sin/cos and float sums differ; the attention is the portable
  one on ARM64).
The gcc build is the reference one; clang's (-fassociative-math lets it fold the two-level
scale d / 256 otherwise) is held to the bounds only.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from homellm.engine.kernels import build

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "homellm" / "engine" / "kernels"
DRIVER = Path(__file__).with_name("kernels_driver.c")
CROSS = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")
QUANTIZED = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
PATHS = ("scalar", "avx2", "avx512", "avxvnni", "neon", "i8mm")

needs_cross = pytest.mark.skipif(
    not (CROSS and QEMU),
    reason="ARM64 tests need an aarch64 cross compiler and qemu's user mode: apt-get install "
           "gcc-aarch64-linux-gnu qemu-user (`make sysdeps` does on Debian as root)")


def compile_flags(machine: str) -> list[str]:
    return [f for f in build.flags(machine) if f not in ("-shared", "-fPIC")]


def compile_driver(cc: list[str], machine: str, out: Path, extra: list[str] = ()) -> Path:
    cmd = [*cc, *compile_flags(machine), *extra, f"-I{KERNELS}", "-o", str(out), str(DRIVER), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stderr[-3000:]}"
    return out


def records(data: bytes) -> dict[str, np.ndarray]:
    out, i = {}, 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        name = data[i + 4:i + 4 + n].decode()
        (c,) = struct.unpack_from("<I", data, i + 4 + n)
        at = i + 8 + n
        out[name] = np.frombuffer(data, np.float32, c, at).copy()
        i = at + 4 * c
    return out


def run(cmd: list[str]) -> dict[str, np.ndarray]:
    res = subprocess.run(cmd, capture_output=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr.decode()[-3000:]}"
    return records(res.stdout)


@pytest.fixture(scope="module")
def x86(tmp_path_factory):
    cc = build.compiler()
    if cc is None or os.uname().machine != "x86_64":
        pytest.skip("the reference is this machine's x86-64 build")
    exe = compile_driver([cc], "x86_64", tmp_path_factory.mktemp("x86") / "driver")
    return run([str(exe)])


@pytest.fixture(scope="module")
def arm_gcc(tmp_path_factory):
    if not (CROSS and QEMU):
        pytest.skip("no aarch64 cross compiler or qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    return compile_driver([CROSS], "aarch64", tmp_path_factory.mktemp("arm") / "driver", ["-static"])


def paths_of(rec) -> list[str]:
    return [p for p, ok in zip(PATHS, rec["cpu"]) if ok]


def rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def vector_ref(x86) -> str:
    """The x86-64 path whose packs are the reference bits: AVX512's, else AVX2's."""
    have = paths_of(x86)
    return "avx512" if "avx512" in have else "avx2"


def check(arm, x86, exact: bool = True):
    """Every record of an ARM64 run against the x86-64 run (the module's bounds)."""
    have = paths_of(arm)
    assert not set(have) & {"avx2", "avx512", "avxvnni"}
    for k, v in arm.items():
        if k.startswith("quant."):
            if exact:
                np.testing.assert_array_equal(v, x86[k], err_msg=k)
            else:
                assert rel(v, x86[k]) < 1e-6, k
    ref = vector_ref(x86)
    counted = {"raw": 0, "pk": 0, "glu": 0, "net": 0}
    for k, v in arm.items():
        kind, parts = k.split(".")[0], k.split(".")
        if kind == "raw" and parts[2] == "scalar":
            want = x86[k]
            if exact and parts[1] in QUANTIZED:
                np.testing.assert_array_equal(v, want, err_msg=k)
            else:
                assert rel(v, want) < 1e-5, k
            counted[kind] += 1
        elif kind in ("pk", "glu"):
            want = x86[".".join([kind, parts[1], ref, *parts[3:]])]
            if exact:
                np.testing.assert_array_equal(v, want, err_msg=k)
            else:
                assert rel(v, want) < 1e-5, k
            counted[kind] += 1
        elif kind in ("net", "dec"):
            vec = parts[2] != "scalar"
            want = x86[".".join([kind, parts[1], ref if vec else "scalar", *parts[3:]])]
            assert rel(v, want) < 5e-4, k
            if kind == "net":
                counted[kind] += 1
                if parts[3] == "2":  # the same bits on any number of threads, and with i8mm as with sdot
                    np.testing.assert_array_equal(v, arm[k[:-1] + "1"], err_msg=k)
                    if parts[2] == "i8mm":
                        np.testing.assert_array_equal(v, arm[k.replace("i8mm", "neon")], err_msg=k)
    return counted


@needs_cross
def test_arm64_runtime_under_qemu_equals_x86(x86, arm_gcc):
    """ARM64 with dot products and i8mm (qemu -cpu max): every path, every type, the network."""
    arm = run([QEMU, "-cpu", "max", str(arm_gcc)])
    assert paths_of(arm) == ["scalar", "neon", "i8mm"]
    counted = check(arm, x86)
    n_packed = len(QUANTIZED)  # (every quantized type has a pack)
    assert counted == {"raw": 10 * 6, "pk": 2 * n_packed * 6, "glu": 2 * n_packed * 2, "net": 3 * 10 * 2}


@needs_cross
@pytest.mark.parametrize("cpu, want", [("neoverse-n1", ["scalar", "neon"]), ("cortex-a53", ["scalar"])])
def test_arm64_paths_chosen_at_run_time(x86, arm_gcc, cpu, want):
    """One binary: a CPU without i8mm runs the sdot kernels, one without dot products the scalar
    code (its quantizer the portable one), with the same results."""
    arm = run([QEMU, "-cpu", cpu, str(arm_gcc), "--no-net"])
    assert paths_of(arm) == want
    check(arm, x86)


@needs_cross
@pytest.mark.skipif(not shutil.which("clang"), reason="no clang")
def test_arm64_builds_with_clang(x86, tmp_path):
    """clang (the compiler of Apple's toolchain) builds the library for ARM64 without an x86
    header or intrinsic, and its runtime meets the bounds."""
    lib = tmp_path / "ggml_cpu.o"
    res = subprocess.run(["clang", "--target=aarch64-linux-gnu", *compile_flags("aarch64"), "-fPIC", "-c",
                          "-Werror=implicit-function-declaration", "-o", str(lib), str(KERNELS / "ggml_cpu.c")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    exe = tmp_path / "driver"
    res = subprocess.run(["clang", "--target=aarch64-linux-gnu", *compile_flags("aarch64"), "-static",
                          f"-I{KERNELS}", "-o", str(exe), str(DRIVER), "-lm"], capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0:
        pytest.skip(f"clang compiles for ARM64 but cannot link here: {res.stderr[-500:]}")
    arm = run([QEMU, "-cpu", "max", str(exe), "--no-net"])
    assert paths_of(arm) == ["scalar", "neon", "i8mm"]
    check(arm, x86, exact=False)


def test_build_flags_per_architecture():
    """ARM64 builds keep products and sums apart (its scalar code rounds as x86-64's)."""
    assert "-ffp-contract=off" in build.flags("aarch64") and "-ffp-contract=off" in build.flags("arm64")
    assert "-ffp-contract=off" not in build.flags("x86_64")
