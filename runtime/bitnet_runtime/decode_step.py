"""The compiled decode step: a whole token (every layer, the final norm and the output layer)
as ONE call into the artifact's Relax VM program, instead of ~15 kernel calls per layer from
Python.

The compiler (``bitnet_compile.program``) builds the program into the artifact's kernels.so;
this module loads it with tvm_ffi alone (the VM is part of the shipped libtvm_runtime.so) and
binds the model's arrays to it once: weights, norms, the KV pool of every layer (the same
arrays the prompt path fills) with the sequence's slot in it, the rotary tables and a
scratch for attention scores. A token then costs: write its embedding row and position into
two small arrays, one VM call.

The argument contract, shared with the compiler: ``decode_<output>(x, slot, pos, cos, sin,
scores, eps, layers, head)`` with ``layers`` a tuple of per-layer tuples in ``layer_params``
order (the caches: a ``KVPool``'s [slots, kv_heads, context, head_dim] arrays) and ``head``
the final norm followed by the output format's ``HEAD_PARAMS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import UserError
from .memory import aligned_zeros, lazy_zeros

HEAD_PARAMS = {"f16": ("tiles",), "i8": ("rows", "scale", "correction"), "hidden": ()}
FUNCTIONS = {fmt: f"decode_{fmt}" for fmt in HEAD_PARAMS}


def layer_params(sub_norms: bool) -> tuple[str, ...]:
    """One layer's arrays, in the order the program takes them."""
    attn_sub, ffn_sub = (("attn_sub_norm",), ("ffn_sub_norm",)) if sub_norms else ((), ())
    return (
        "input_norm", "qkv", "qkv_scale", *attn_sub, "o", "o_scale",
        "post_norm", "gate_up", "gate_up_scale", *ffn_sub, "down", "down_scale",
        "k_cache", "v_cache",
    )  # fmt: skip


class DecodeStep:
    """One model's arrays bound to the artifact's decode program: ``__call__(row, pos)`` runs
    one token and returns its logits (or, for the "hidden" output, the final-normed hidden
    state). ``layers``: per layer a mapping with the names of ``layer_params``; ``head``: the
    final norm and the output format's arrays; ``kernel_calls``: the kernels one step runs
    (the manifest's count)."""

    def __init__(self, module: Any, output: str, hidden: int, slot: int, cos: np.ndarray, sin: np.ndarray, scores: np.ndarray,
                 eps: np.ndarray, layers: Sequence[dict], head: Sequence[np.ndarray], sub_norms: bool, kernel_calls: int):  # fmt: skip
        import tvm_ffi

        try:
            vm = module["vm_load_executable"]()
        except (AttributeError, KeyError, RuntimeError):
            raise UserError("the artifact has no compiled decode step: rebuild it with this bitnet-compile") from None
        vm["vm_initialization"](1, 0, 2, 1, 0, 2)  # CPU device 0 with the pooled allocator, for the program and the host
        self.function = vm[FUNCTIONS[output]]
        self.kernel_calls = kernel_calls
        self.x, self.pos = aligned_zeros((1, hidden), np.float32), aligned_zeros((1,), np.int32)
        self.slot = aligned_zeros((1,), np.int32)
        self.slot[0] = slot
        tensor = tvm_ffi.from_dlpack  # the tensors keep their numpy arrays alive (DLPack)
        names = layer_params(sub_norms)
        layer_tensors = tvm_ffi.convert([[tensor(layer[name]) for name in names] for layer in layers])
        head_tensors = tvm_ffi.convert([tensor(a) for a in head])  # converted once, not per call (~10 us)
        self._args = (
            tensor(self.x),
            tensor(self.slot),
            tensor(self.pos),
            tensor(cos),
            tensor(sin),
            tensor(scores),
            tensor(eps),
            layer_tensors,
            head_tensors,
        )

    def __call__(self, row: np.ndarray, pos: int) -> np.ndarray:
        self.x[0] = row
        self.pos[0] = pos
        return np.from_dlpack(self.function(*self._args))[0]


def scores_buffer(rows: int, kv_heads: int, group: int, context: int) -> np.ndarray:
    """The attention kernel's scratch for ``rows`` decoding tokens: one row of scores per query
    head, for the whole context (mapped as it is used)."""
    return lazy_zeros((rows, kv_heads, group, context), np.float32)
