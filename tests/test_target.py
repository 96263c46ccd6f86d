"""Target parsing: every accepted form resolves to what LLVM is really told, and every mistake is
a one-line UserError that says what would have been accepted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_compile.errors import UserError
from bitnet_compile.target import PRESET_DIR, STATUSES, TargetSpec, list_presets, parse_target

tvm = pytest.importorskip("tvm")

SUPPORTED = [p["name"] for p in list_presets() if p["status"] == "supported"]


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def _attrs(spec: TargetSpec) -> dict:
    t = spec.tvm_target()
    t = t.host if spec.is_gpu else t
    return {k: t.attrs[k] for k in ("mcpu", "mtriple", "mattr", "num-cores") if k in t.attrs}


def test_import_does_not_load_tvm() -> None:
    code = "import sys, bitnet_compile.target; assert 'tvm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("text", ["llvm -mcpu=native", "native", "llvm --mcpu native"])
def test_native_resolves_to_host_cpu(text: str) -> None:
    spec = parse_target(text)
    host_cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    assert spec.mcpu == host_cpu != "generic"
    assert spec.triple == "x86_64-linux-gnu"  # never the wheel's conda triple
    assert spec.arch == "x86_64"
    assert spec.num_cores >= 1
    assert spec.name == "native"  # the CLI spellings say exactly what the preset says
    attrs = _attrs(spec)
    assert attrs["mcpu"] == host_cpu and attrs["mtriple"] == "x86_64-linux-gnu"
    # Never compile for an extension the host does not report (VMs mask some).
    host = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")()
    on = {k for k, v in host.items() if v}
    assert set(spec.required_features) <= on
    flags = _cpuinfo_flags()
    if {"avx512bw", "avx512f"} <= flags:
        assert spec.isa == "avx512"
    elif "avx2" in flags:
        assert spec.isa == "avx2"


def test_classic_syntax_with_mattr() -> None:
    spec = parse_target("llvm -mcpu=skylake-avx512 -mtriple=x86_64-linux-gnu -mattr=+avx512vnni,-avx512bw -num-cores=4")
    assert (spec.name, spec.mcpu, spec.triple, spec.num_cores) == ("custom", "skylake-avx512", "x86_64-linux-gnu", 4)
    assert spec.mattr == ("+avx512vnni", "-avx512bw")
    assert "avx512vnni" in spec.features and "avx512bw" not in spec.features
    assert spec.isa == "avx2"  # the AVX-512 LUT kernel needs avx512bw
    attrs = _attrs(spec)
    assert attrs["mcpu"] == "skylake-avx512"
    assert list(attrs["mattr"]) == ["+avx512vnni", "-avx512bw"]
    assert int(attrs["num-cores"]) == 4


def test_space_separated_and_double_dash_options() -> None:
    a = parse_target("llvm -mcpu haswell -mtriple x86_64-linux-gnu")
    b = parse_target("llvm --mcpu=haswell --mtriple=x86_64-linux-gnu")
    assert a == b and a.isa == "avx2"


def test_minus_avx512f_on_avx512_cpu_gives_avx2() -> None:
    spec = parse_target("llvm -mcpu=icelake-server -mtriple=x86_64-linux-gnu -mattr=-avx512f")
    assert spec.isa == "avx2"
    assert not any(f.startswith("avx512") for f in spec.features)  # LLVM drops the dependents
    assert "avx2" in spec.features
    assert "-avx512f" in str(spec.tvm_target())


def test_json_form_and_round_trip() -> None:
    text = json.dumps({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4", "mattr": ["-avx512vbmi"], "num-cores": 2})
    spec = parse_target(text)
    assert (spec.mcpu, spec.isa, spec.num_cores) == ("znver4", "avx512", 2)
    assert "avx512vnni" in spec.features and "avx512vbmi" not in spec.features
    assert parse_target(json.dumps(spec.tvm_dict())) == spec
    manifest = spec.to_json()
    json.dumps(manifest)
    assert manifest["features"] == sorted(manifest["features"])
    assert manifest["required_features"] == spec.required_features
    assert "prefer-256-bit" not in spec.required_features  # tuning flags are not CPU requirements


@pytest.mark.parametrize("name", SUPPORTED)
def test_each_supported_preset_builds(name: str) -> None:
    spec = parse_target(name)
    assert spec.name == name
    attrs = _attrs(spec)
    assert attrs["mcpu"] == spec.mcpu and attrs["mtriple"] == spec.triple
    assert list(attrs.get("mattr", [])) == list(spec.mattr)
    assert spec.isa in {"avx2", "avx512", "neon", "cuda", "metal"}


def test_preset_contents() -> None:
    assert {"native", "x86-avx2", "x86-avx512", "x86-avx512-vnni"} <= set(SUPPORTED)
    cuda, metal = parse_target("cuda"), parse_target("metal")
    assert (cuda.kind, cuda.gpu_arch, cuda.arch) == ("cuda", "sm_80", "x86_64") and cuda.tvm_target().attrs["arch"] == "sm_80"
    assert parse_target("cuda -arch=sm_90").gpu_arch == "sm_90" and parse_target('{"kind": "cuda", "arch": "sm_86"}').gpu_arch == "sm_86"
    assert (metal.kind, metal.triple) == ("metal", "arm64-apple-macos") and metal.tvm_target().kind.name == "metal"
    assert TargetSpec.from_json(cuda.to_json()) == cuda
    neon = parse_target("arm-neon")
    assert (neon.arch, neon.isa) == ("aarch64", "neon") and {"neon", "dotprod", "fullfp16"} <= neon.features
    assert parse_target("x86-avx2").isa == "avx2"
    avx512 = parse_target("x86-avx512")
    assert avx512.isa == "avx512" and {"avx512bw", "avx512vl"} <= avx512.features
    vnni = parse_target("x86-avx512-vnni")
    assert vnni.isa == "avx512" and {"avx512vnni", "avx512vbmi"} <= vnni.features
    for path in PRESET_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["name"] == path.stem and data["description"] and data["status"] in STATUSES
        assert data["status"] != "stub" or data["missing"]


@pytest.mark.parametrize("name", ["hexagon", "intel-npu", "apple-ane"])
def test_npu_stubs_are_listed_and_refused_clearly(name: str) -> None:
    preset = next(p for p in list_presets() if p["name"] == name)
    assert preset["status"] == "stub"
    with pytest.raises(UserError) as info:
        parse_target(name)
    msg = str(info.value)
    assert "\n" not in msg and f"{name!r}" in msg and "stub, listed but not built" in msg and preset["missing"] in msg


def test_targets_table_lists_every_preset_with_its_status() -> None:
    from bitnet_compile import target_table

    rows = {r.name: r for r in target_table.rows()}
    assert set(rows) == {p["name"] for p in list_presets()}
    assert rows["native"].status == "runs here" and "avx2" in rows["native"].features
    assert rows["arm-neon"].kind == "aarch64 (neon)" and "dotprod" in rows["arm-neon"].features
    if shutil.which("qemu-aarch64-static") and shutil.which("aarch64-linux-gnu-gcc"):
        assert rows["arm-neon"].status == "verified under emulation"
    assert {rows[n].status for n in ("hexagon", "intel-npu", "apple-ane")} == {"stub"}
    assert rows["metal"].status.startswith("compile-only") and rows["cuda"].status in {"runs here", "compile-only", "needs nvcc to compile"}
    text = target_table.format_table(list(rows.values()))
    assert text.splitlines()[0].split() == ["target", "kind", "kernel", "features", "status", "tuned", "records"]
    assert len(text.splitlines()) == len(rows) + 2


def test_target_reaches_llvm() -> None:
    from tvm import te

    a = te.placeholder((256,), "int8", name="A")
    b = te.compute((256,), lambda i: a[i] + a[i], name="B")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    spec = parse_target("llvm -mcpu=icelake-server -mtriple=x86_64-linux-gnu -mattr=-avx512f")
    ll = tvm.compile(mod, target=spec.tvm_target()).mod.inspect_source("ll")
    assert '"target-cpu"="icelake-server"' in ll and "-avx512f" in ll


@pytest.mark.parametrize(
    "text, words",
    [
        ("cuda -arch=sm_50", "sm_61 or newer"),
        ("cuda -arch=ampere", "sm_61 or newer"),
        ("cuda -arch=sm_90 -mcpu=x86-64", "unsupported target option(s) mcpu"),
        ("metal -arch=apple7", "accepted for metal: none"),
        ("hexagon", "stub"),
        ('{"kind": "rocm"}', "not yet supported"),
        ("x86-avx1024", "unknown target"),
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ('["llvm"]', "unknown target"),
        ('{"mcpu": "haswell"}', "kind"),
        ("llvm -mcpu", "needs a value"),
        ("llvm mcpu=haswell", "cannot parse"),
        ("llvm -mcpu=haswell -opt-level=3", "unsupported target option"),
        ("llvm -mcpu=haswell -num-cores=zero", "num-cores"),
        ("llvm -mcpu=notacpu -mtriple=x86_64-linux-gnu", "does not know the CPU"),
        ("llvm -mcpu=haswell -mtriple=x86_64-linux-gnu -mattr=+avx513", "does not know the feature"),
        ("llvm -mcpu=sandybridge -mtriple=x86_64-linux-gnu", "AVX2"),
        ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}', "dotprod"),
        ("llvm -mtriple=riscv64-linux-gnu", "not supported"),
    ],
)
def test_bad_targets_raise_one_line_user_errors(text: str, words: str) -> None:
    with pytest.raises(UserError) as info:
        parse_target(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert words.lower() in msg.lower()
    for name in SUPPORTED:
        assert name in msg
    assert "llvm -mcpu=" in msg
