"""The decode step as one compiled program: every layer of a token, the final norm and the
output layer, written as a Relax function over the artifact's kernels and compiled into the
same library. The device runtime runs it with the Relax VM inside the shipped
libtvm_runtime.so (``bitnet_runtime.decode_step``): one call per token instead of ~15 kernel
calls per layer from Python.

The program is straight-line: per layer (as ``bitnet_runtime.model`` runs it)
    rmsnorm_quantize(h, input_norm) -> matmul(qkv) -> dequantize -> rotary_append (writes the
    sequence's slot of the KV pool at pos) -> decode_attention -> [rmsnorm_]quantize(attn_sub_norm) -> matmul(o)
    -> residual_dequantize(+h) -> rmsnorm_quantize(post_norm) -> matmul(gate_up) -> dequantize
    -> gated_act -> [rmsnorm_]quantize(ffn_sub_norm) -> matmul(down) -> residual_dequantize(+h)
then rmsnorm(final) and the output layer's kernels. The matmul is each weight layout's own
calling convention (``MATMULS``); reshapes between kernels are views (the Relax VM's
reshape inside a dataflow block copies nothing). Buffers between kernels come from the VM's
static memory plan, allocated on the first call and reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tvm import relax, tirx

from bitnet_runtime import layout, layout_dot2, layout_f16, layout_i8
from bitnet_runtime.decode_step import FUNCTIONS, layer_params
from bitnet_runtime.manifest import Decoder, KernelEntry, LinearEntry, OutputLayer


def _tensor(shape, dtype: str) -> relax.TensorType:
    return relax.TensorType(shape, dtype)


def _any(ndim: int, dtype: str) -> relax.TensorType:
    return relax.TensorType(ndim=ndim, dtype=dtype)


@dataclass
class Emitter:
    """Emits kernel calls into the Relax function being built."""

    bb: relax.BlockBuilder
    calls: int = 0  # kernel calls emitted so far

    def call(self, kernel: str, args: list, outs: list[relax.TensorType]):
        """``kernel``(args) -> its outputs (one value, or a tuple's items): a destination-passing
        call of the kernel by name, which the VM finds in the kernels' module it imports."""
        self.calls += 1
        out = self.bb.emit(relax.call_dps_packed(relax.ExternFunc(kernel), relax.Tuple(args), outs if len(outs) > 1 else outs[0]))
        return [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(outs))] if len(outs) > 1 else out

    def reshape(self, value, shape: tuple[int, ...]):
        return self.bb.emit(relax.op.reshape(value, shape))

    def item(self, value, index: int):
        return self.bb.emit(relax.TupleGetItem(value, index))


def _dot2(e: Emitter, entry: LinearEntry, q, packed):
    n_p, k_p = entry.n_padded, entry.k_padded
    acts = e.reshape(q, (1, k_p // layout_dot2.CHUNK, 4, 4))
    acc = e.call(entry.kernels["gemv"], [acts, packed], [_tensor((1, n_p // layout_dot2.ROWS, layout_dot2.ROWS), "int32")])
    return e.reshape(acc, (1, n_p))


def _lut(e: Emitter, entry: LinearEntry, q, packed):
    n_p, k_p = entry.n_padded, entry.k_padded
    tables = e.call(entry.kernels["lut_table"], [q], [_tensor(layout.table_shape(1, k_p), "int8")])
    acc = e.call(entry.kernels["gemv"], [tables, packed], [_tensor(layout.acc_shape(1, n_p, entry.layout_params["rows"]), "int32")])
    return e.reshape(acc, (1, n_p))


# weight layout -> emitter of one token's matmul: (emitter, entry, q [1, K_padded], packed) -> int32 [1, N_padded]
MATMULS: dict[str, Callable] = {layout_dot2.VERSION: _dot2, layout.VERSION: _lut}
PACKED_NDIM = {layout_dot2.VERSION: 4, layout.VERSION: 4}


def _quantized(e: Emitter, entry: LinearEntry, h, norm, eps):
    """(q, scale) of h, RMS-normalized with ``norm`` first where it has one."""
    outs = [_tensor((1, entry.k_padded), "int8"), _tensor((1,), "float32")]
    if norm is None:
        return e.call(entry.kernels["quantize"], [h], outs)
    return e.call(entry.kernels["rmsnorm_quantize"], [h, norm, eps], outs)


def _linear(e: Emitter, entry: LinearEntry, h, norm, eps, packed, scale, residual=None, residual_kernel: str | None = None):
    """A BitLinear of one token: float32 [1, n], added to ``residual`` (by ``residual_kernel``) when given."""
    q, act_scale = _quantized(e, entry, h, norm, eps)
    acc = MATMULS[entry.layout](e, entry, q, packed)
    if residual is None:
        return e.call(entry.kernels["dequantize"], [acc, act_scale, scale], [_tensor((1, entry.n), "float32")])
    return e.call(residual_kernel, [acc, act_scale, scale, residual], [_tensor((1, entry.n), "float32")])


def _layer(e: Emitter, d: Decoder, linears: dict[str, LinearEntry], kernels: dict, h, layer, slot, pos, cos, sin, scores, eps):
    names = layer_params(d.sub_norms)
    w = {name: e.item(layer, i) for i, name in enumerate(names)}
    qkv = _linear(e, linears["qkv"], h, w["input_norm"], eps, w["qkv"], w["qkv_scale"])
    caches = [w["k_cache"], w["v_cache"]]
    q = e.call(kernels["rotary_append"], [qkv, cos, sin, slot, pos, *caches], [_tensor((1, d.heads, d.head_dim), "float32")])
    att = e.call(kernels["decode_attention"], [q, *caches, slot, pos, scores], [_tensor((1, d.heads * d.head_dim), "float32")])
    h = _linear(e, linears["o"], att, w.get("attn_sub_norm"), eps, w["o"], w["o_scale"], h, kernels["residual_o"])
    gate_up = _linear(e, linears["gate_up"], h, w["post_norm"], eps, w["gate_up"], w["gate_up_scale"])
    act = e.call(kernels["gated_act"], [gate_up], [_tensor((1, d.ffn), "float32")])
    return _linear(e, linears["down"], act, w.get("ffn_sub_norm"), eps, w["down"], w["down_scale"], h, kernels["residual_down"])


def _head(e: Emitter, fmt: str, output: OutputLayer | None, h, head):
    """The output layer of format ``fmt`` on the final-normed h (``hidden``: h itself)."""
    if fmt == "hidden":
        return h
    f = output.formats[fmt]
    if fmt == "f16":
        rows = layout_f16.padded_rows(output.n)
        out = e.call(f.kernels["gemv"], [h, e.item(head, 1)], [_tensor((rows // layout_f16.ROWS, layout_f16.ROWS), "float32")])
        return e.reshape(out, (1, rows))
    q, act_scale = e.call(f.kernels["quantize"], [h], [_tensor((1, f.k_padded), "int8"), _tensor((1,), "float32")])
    acts = e.reshape(q, (1, f.k_padded // layout_i8.CHUNK, layout_i8.CHUNK))
    gemv_out = [_tensor((f.n_padded // layout_i8.ROWS, layout_i8.ROWS), "int32")]
    acc = e.call(f.kernels["gemv"], [acts, e.item(head, 1), e.item(head, 3)], gemv_out)
    acc = e.reshape(acc, (1, f.n_padded))
    return e.call(f.kernels["dequantize"], [acc, act_scale, e.item(head, 2)], [_tensor((1, output.n), "float32")])


HEAD_SINFO = {
    "f16": [_any(3, "float16")],
    "i8": [_any(4, "int8"), _any(1, "float32"), _any(2, "int32")],
    "hidden": [],
}


def _layer_sinfo(d: Decoder, linears: dict[str, LinearEntry], slots, ctx) -> relax.TupleType:
    vec = lambda n: _tensor((n,), "float32")  # noqa: E731
    cache = _tensor((slots, d.kv_heads, ctx, d.head_dim), "float32")
    by_name = {
        "input_norm": vec(d.hidden), "attn_sub_norm": vec(d.heads * d.head_dim), "post_norm": vec(d.hidden), "ffn_sub_norm": vec(d.ffn),
        "k_cache": cache, "v_cache": cache,
    }  # fmt: skip
    for name, entry in linears.items():
        by_name[name] = _any(PACKED_NDIM[entry.layout], "uint8")
        by_name[f"{name}_scale"] = vec(entry.n)
    return relax.TupleType([by_name[name] for name in layer_params(d.sub_norms)])


def module(d: Decoder, linears: dict[str, LinearEntry], kernels: dict, output: OutputLayer | None):
    """The decode functions, one per output format (``formats``), calling the artifact's
    kernels by name, and the kernels each runs per token (the manifest's ``kernel_calls``).
    Compiled apart from the kernels and linked to them by import (``artifact.compile_kernels``),
    so the kernels are built exactly as in an artifact without a decode step."""
    bb = relax.BlockBuilder()
    e = Emitter(bb)
    ctx, slots = tirx.Var("context", "int64"), tirx.Var("slots", "int64")
    calls = {}
    for fmt in formats(output):
        x = relax.Var("x", _tensor((1, d.hidden), "float32"))
        slot, pos = relax.Var("slot", _tensor((1,), "int32")), relax.Var("pos", _tensor((1,), "int32"))
        cos, sin = (relax.Var(name, _tensor((ctx, d.head_dim), "float32")) for name in ("cos", "sin"))
        scores = relax.Var("scores", _tensor((1, d.kv_heads, d.heads // d.kv_heads, ctx), "float32"))
        eps = relax.Var("eps", _tensor((1,), "float32"))
        layers = relax.Var("layers", relax.TupleType([_layer_sinfo(d, linears, slots, ctx)] * d.layers))
        head = relax.Var("head", relax.TupleType([_tensor((d.hidden,), "float32"), *HEAD_SINFO[fmt]]))
        with bb.function(FUNCTIONS[fmt], [x, slot, pos, cos, sin, scores, eps, layers, head]):
            e.calls = 0
            with bb.dataflow():
                h = x
                for i in range(d.layers):
                    h = _layer(e, d, linears, kernels, h, e.item(layers, i), slot, pos, cos, sin, scores, eps)
                normed = e.call(kernels["rmsnorm"], [h, e.item(head, 0), eps], [_tensor((1, d.hidden), "float32")])
                out = bb.emit_output(_head(e, fmt, output, normed, head))
            bb.emit_func_output(out)
        calls[fmt] = e.calls
    return bb.get(), calls


def formats(output: OutputLayer | None) -> list[str]:
    """The decode functions an artifact gets: "hidden" always, and each compiled output format."""
    return ["hidden"] + [fmt for fmt in ("f16", "i8") if output and fmt in output.formats]


def plan_kernels(d: Decoder, linears: dict[str, LinearEntry]) -> tuple[dict[str, str], list[KernelEntry]]:
    """The decoder kernels the program calls beyond the linears' own: names by role, entries."""
    shape = {"heads": d.heads, "kv_heads": d.kv_heads, "head_dim": d.head_dim}
    tag = f"h{d.heads}_kv{d.kv_heads}_d{d.head_dim}"
    entries = [
        KernelEntry(f"rotary_append_{tag}", "rotary_append", shape),
        KernelEntry(f"decode_attention_{tag}", "decode_attention", shape),
        KernelEntry(f"gated_act_{d.act}_n{d.ffn}", "gated_act", {"n": d.ffn, "act": d.act}),
        KernelEntry(f"rmsnorm_k{d.hidden}", "rmsnorm", {"k": d.hidden}),
    ]
    roles = {
        "rotary_append": entries[0].name,
        "decode_attention": entries[1].name,
        "gated_act": entries[2].name,
        "rmsnorm": entries[3].name,
    }
    for name in ("o", "down"):
        entry = linears[name]
        kernel = KernelEntry(
            f"residual_dequantize_n{entry.n}_p{entry.n_padded}", "residual_dequantize", {"n": entry.n, "n_padded": entry.n_padded}
        )
        if kernel.name not in {k.name for k in entries}:
            entries.append(kernel)
        roles[f"residual_{name}"] = kernel.name
    return roles, entries
