"""The typed manifest: written and read back unchanged, and every wrong or old manifest a
one-line error before anything is loaded (no compiler, no kernels: a manifest alone)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from bitnet_runtime.__main__ import main
from bitnet_runtime.errors import UserError
from bitnet_runtime.manifest import (
    MANIFEST_FILE,
    Decoder,
    Device,
    FileEntry,
    KernelEntry,
    LinearEntry,
    Manifest,
    OutputFormat,
    OutputLayer,
    Program,
    digest_of,
    read_manifest,
)


def _manifest() -> Manifest:
    """Every field set, the optional ones included (a CUDA artifact's, with an output layer)."""
    shape = {"n": 100, "k": 36, "n_padded": 128, "k_padded": 48}
    return Manifest(
        created="2026-12-04T00:00:00+00:00",
        compiler={"bitnet_compile": "0.1.0", "tvm": "0.27.0"},
        model="tiny",
        target={"kind": "cuda", "arch": "x86_64", "isa": "cuda"},
        required_cpu_features=("sse2",),
        family="gpu2",
        library=FileEntry("kernels.so", "ab" * 32),
        runtime_library=FileEntry("libtvm_runtime.so", "cd" * 32),
        kernels=(
            KernelEntry("quantize_k36_p48", "quantize", shape),
            KernelEntry("gpu2_gemv_n100_k36", "gpu2_gemv", shape, {"rows_per_block": 16, "k_split": 32, "token_tile": 8}, "default"),
            KernelEntry("i8_gemv_n300_k64", "i8_gemv", {"n": 300, "k": 64, "n_padded": 320, "k_padded": 64, "variant": "avx2"}),
        ),
        linears=(LinearEntry("l100", 100, 36, 128, 48, "dot2-v1", {"token_tile": 8}, {"gemv": "gpu2_gemv_n100_k36"}),),
        output_layer=OutputLayer(
            300,
            64,
            {
                "f16": OutputFormat("f16-tiles-v1", {"gemv": "f16_gemv_n300_k64"}),
                "i8": OutputFormat("i8-tiles-v1", {"gemv": "i8_gemv_n300_k64"}, 320, 64),
            },
        ),
        program=Program(
            Decoder(2, 64, 4, 2, 16, 128, "relu2", True),
            {"hidden": "decode_hidden", "f16": "decode_f16"},
            {"rotary_append": "rotary_append_h4_kv2_d16", "decode_attention": "decode_attention_h4_kv2_d16"},
            {"hidden": 31, "f16": 32},
        ),
        device_libraries=(FileEntry("libcudart.so.13", "ef" * 32),),
        sources=(FileEntry("kernels.cu", "01" * 32),),
        device=Device("cuda", "fatbin", {"gpu2_gemv_n100_k36": {"grid": [8, 1, 1], "threads": [32, 16, 1]}}, arch="sm_80"),
    )


def test_to_json_from_json_round_trip() -> None:
    manifest = _manifest()
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert Manifest.from_json(json.loads(manifest.dumps())) == manifest
    assert next(iter(manifest.to_json())) == "format_version"


def test_written_manifest_reads_back(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text(_manifest().dumps())
    manifest = read_manifest(tmp_path)
    assert manifest == _manifest() and manifest.device_kind == "cuda"
    assert manifest.kernel("i8_gemv_n300_k64").shape["variant"] == "avx2" and manifest.kernel("nope") is None
    assert manifest.linears[0].params == {"n": 100, "k": 36, "n_padded": 128, "k_padded": 48, "token_tile": 8}
    assert manifest.output_layer.params("f16") == {"n": 300, "k": 64}
    assert manifest.output_layer.params("i8") == {"n": 300, "k": 64, "n_padded": 320, "k_padded": 64}


def _write(directory: Path, edit) -> Path:
    """The manifest with ``edit`` made and its digest made to match (a deliberate edit)."""
    data = _manifest().to_json()
    edit(data)
    data["digest"] = digest_of(data)
    (directory / MANIFEST_FILE).write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("edit", [lambda m: m.update(format_version=2), lambda m: m.pop("format_version")], ids=["version-2", "no-version"])
def test_old_manifest_asks_for_a_rebuild(tmp_path: Path, edit) -> None:
    """Through the device's command line: exit 2, one line naming the command, no traceback."""
    _write(tmp_path, edit)
    done = subprocess.run(
        [sys.executable, "-m", "bitnet_runtime", "verify", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "format version" in done.stderr and "rebuild it with bitnet-compile" in done.stderr


def _set(path: str, value):
    """An edit that sets the JSON value at a dotted path (list indices as numbers)."""

    def edit(data: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parents:
            data = data[p]
        data[last] = value

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (_set("kernels", {"a": 1}), "manifest.kernels has the wrong type (dict)"),
        (_set("kernels.0", "quantize"), "manifest.kernels[0] is not a JSON object"),
        (_set("kernels.0.op", "softmax"), "manifest.kernels[0].op 'softmax' is not a kernel"),
        (_set("kernels.1.shape.n", "100"), "manifest.kernels[1].shape.n has the wrong type (str)"),
        (_set("kernels.2.shape.variant", None), "manifest.kernels[2].shape must map names to int or str"),
        (_set("kernels.1.knobs.k_split", [32]), "manifest.kernels[1].knobs must map names to"),
        (_set("linears.0.n", "100"), "manifest.linears[0].n has the wrong type (str)"),
        (_set("linears.0.k", True), "manifest.linears[0].k has the wrong type (bool)"),
        (_set("linears.0.layout_params.token_tile", 8.5), "manifest.linears[0].layout_params must map names to int"),
        (_set("linears.0.kernels.gemv", 3), "manifest.linears[0].kernels must map names to str"),
        (_set("library.file", 7), "manifest.library.file has the wrong type (int)"),
        (_set("library", None), "manifest.library has the wrong type (NoneType)"),
        (_set("required_cpu_features", ["sse2", 4]), "required_cpu_features must be a list of strings"),
        (_set("output_layer.formats.i8.n_padded", "320"), "manifest.output_layer.formats.i8.n_padded has the wrong type"),
        (_set("device.launch", []), "manifest.device.launch has the wrong type (list)"),
        (_set("program.decoder.heads", 0), "manifest.program.decoder has a size below 1"),
        (_set("program.decoder.act", 3), "manifest.program.decoder.act has the wrong type (int)"),
        (_set("program.kernel_calls", {"hidden": 31}), "kernel_calls must name the same formats"),
        (lambda m: m.pop("linears"), "manifest.linears is missing"),
    ],
)
def test_wrong_types_are_one_line_errors(tmp_path: Path, capsys, edit, message: str) -> None:
    assert main(["verify", str(_write(tmp_path, edit))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / MANIFEST_FILE}: manifest is corrupted: ")
    assert message in err


def test_a_manifest_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(UserError, match="manifest is not a JSON object"):
        read_manifest(tmp_path)
