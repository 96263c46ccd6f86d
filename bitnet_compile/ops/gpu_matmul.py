"""GPU ternary matmul (CUDA, Metal): int32 out[T, N] = q[T, K] @ W[N, K]^T on layout dot2-v1.

The packed dot2-v1 bytes [N/16, K/16, 16, 4] are read as uint32 words [N/16, K/16, 16]: one
word holds the 16 weights (+1) one row has in one k-chunk, byte j holding in bits 2f..2f+1
the weight of column 16c + 4f + j. So ``(word >> 2f) & 0x03030303`` is a char4 of w + 1 for
columns 16c + 4f + 0..3, lined up with activation dword ``q32[4c + f]`` when the int8
activations are read as int32 [T, K/16, 4]. One more step turns w + 1 into w byte-wise with
no carry between bytes: ``((x + 0x7f7f7f7f) ^ 0x80808080)`` maps bytes {0, 1, 2} to
{0xff, 0x00, 0x01} = {-1, 0, 1} (in uint32, where nothing overflows). The dot product is
then a signed 4 x int8 dot4 per (chunk, field), and the kernel's output is q @ W^T exactly,
with no sum(q) correction: |acc| <= 128 * K, exact for any K below 2**24.

The dot4 has three spellings of the same value (``DOT4``): CUDA's ``__dp4a`` (sm_61+), and an
explicit byte unpack in int32 for Metal (no dp4a) and for the CPU check that proves the
views, masks and sign step on this machine without a GPU. Decodes are written in 32-bit
integers: TVM 0.27's CUDA codegen crashed on a decode written with uint8 shifts.

Kernels (launch geometry):
- GEMV (``gemv=True``, one token): ``rows_per_block`` rows per block on threadIdx.y,
  ``k_split`` threads per row on threadIdx.x striding over the k-chunks (adjacent lanes read
  adjacent 64-byte chunks of a row block, so a block streams its rows contiguously), then a
  cross-thread sum that TVM lowers to warp shuffles. grid = N_padded / rows_per_block,
  block = (k_split, rows_per_block).
- GEMM (dynamic ``tiles``: tokens as [tiles, token_tile], padded by the runtime like the CPU
  dot2 GEMM): a block computes ``token_tile`` tokens x ``rows_per_block`` rows; each thread
  owns one row and token_tile register accumulators, so a decoded weight word is used
  token_tile times. grid = (N_padded / rows_per_block, tiles), block = rows_per_block.
  (A dynamic ``tokens`` split with a predicate made the accumulator's compacted size dynamic:
  CUDA codegen then fails with "Can only handle constant size stack allocation".)
- act_quant / dequant GPU schedules live in their modules (``build_primfunc_gpu``).

Compiling: ``tvm.compile`` alone leaves CUDA source in the device module, which a device could
only compile with TVM installed; bitnet_compile/cuda_toolchain.py has nvcc build a fatbin at
compile time instead (and says why that needs TVM's CUDA runtime loaded). sm_80 (A100) is the
default arch; the fatbin also carries its PTX, which ran exactly on an H200 (sm_90); dp4a needs
sm_61+.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import tvm
from tvm import te, tirx

from bitnet_runtime import layout_dot2
from bitnet_runtime import reference as _reference
from bitnet_runtime.layout import round_up
from bitnet_runtime.layout_dot2 import CHUNK, ROWS

from ..errors import UserError
from .case import Case
from .operator import GPU_ISAS, Operator, knobs_of
from .space import Constraint, SearchSpace, require_positive

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..target import TargetSpec

reference = _reference.ternary_matmul

DEVICES = ("cuda", "metal", "cpu")
FIELD_MASK = 0x03030303
BYTE_BIAS = 0x7F7F7F7F  # + bias then ^ SIGN_BITS: bytes {0, 1, 2} -> {-1, 0, 1}
SIGN_BITS = 0x80808080
MAX_THREADS = 1024  # per block, CUDA and Metal


@dataclass(frozen=True)
class GpuGemvKnobs:
    """Launch knobs of the GPU GEMV.

    rows_per_block: output rows one thread block computes (threadIdx.y). N_padded must be a
        multiple.
    k_split: threads per row (threadIdx.x), each summing every k_split-th chunk before the
        cross-thread sum; a power of two up to the warp (32) keeps the sum in shuffles.
    """

    rows_per_block: int
    k_split: int

    def check(self) -> None:
        require_positive(self, "rows_per_block", "k_split")
        _check_threads(self.rows_per_block * self.k_split)


@dataclass(frozen=True)
class GpuGemmKnobs:
    """Launch knobs of the GPU GEMM.

    rows_per_block: output rows one thread block computes (threadIdx.x, one row per thread).
    token_tile: tokens per block, i.e. register accumulators per thread, each decoded weight
        word reused that many times.
    """

    rows_per_block: int
    token_tile: int

    def check(self) -> None:
        require_positive(self, "rows_per_block", "token_tile")
        _check_threads(self.rows_per_block)


def _check_threads(threads: int) -> None:
    if threads > MAX_THREADS:
        raise UserError(f"knobs give {threads} threads per block, more than {MAX_THREADS}")


GEMV_SPACE = SearchSpace(
    knobs={"rows_per_block": (1, 2, 4, 8, 16, 32), "k_split": (4, 8, 16, 32)},
    constraints=(
        Constraint("rows_per_block * k_split <= 1024", "a block has at most 1024 threads"),
        Constraint("k_split * 16 <= k or k_split == 4", "lanes past the last chunk idle"),
    ),
)
GEMM_SPACE = SearchSpace(
    knobs={"rows_per_block": (32, 64, 128, 256), "token_tile": (1, 2, 4, 8, 16)},
    constraints=(Constraint("rows_per_block <= 1024", "a block has at most 1024 threads"),),
)


def kernel_shape(n: int, k: int, knobs: dict, target: TargetSpec | None = None) -> tuple[dict, dict]:
    """The manifest shape of an (n, k) layer padded for these knobs (N to whole blocks of
    rows_per_block and of 16 rows, K to whole chunks), and the knobs."""
    n_p, k_p = layout_dot2.padded_shape(n, k, 1, 1)
    return {"n": n, "k": k, "n_padded": round_up(n_p, knobs["rows_per_block"]), "k_padded": k_p}, knobs


# ----------------------------------------------------------------------------- the dot4


def signed_field(word, f: int):
    """int32 char4 of the weights (-1, 0, 1) of field f: mask, then bias and flip each byte's
    sign bit, all in uint32 so no step overflows."""
    x = (word >> tirx.const(2 * f, "uint32")) & tirx.const(FIELD_MASK, "uint32")
    return ((x + tirx.const(BYTE_BIAS, "uint32")) ^ tirx.const(SIGN_BITS, "uint32")).astype("int32")


def _byte(word, j: int):
    """Signed byte j of an int32 word, in int32 ((b ^ 128) - 128 sign-extends without shifts left)."""
    b = (word >> tirx.const(8 * j, "int32")) & tirx.const(0xFF, "int32")
    return (b ^ tirx.const(0x80, "int32")) - tirx.const(0x80, "int32")


def dot4_unpacked(a, b):
    """sum_j a.byte[j] * b.byte[j] over signed bytes, in plain int32 arithmetic."""
    terms = [_byte(a, j) * _byte(b, j) for j in range(4)]
    return terms[0] + terms[1] + terms[2] + terms[3]


def dot4_dp4a(a, b):
    """The same sum as one CUDA __dp4a (int, int, int overload: signed bytes)."""
    return tirx.call_pure_extern("int32", "__dp4a", a, b, tirx.const(0, "int32"))


DOT4 = {"cuda": dot4_dp4a, "metal": dot4_unpacked, "cpu": dot4_unpacked}


# ----------------------------------------------------------------------------- compute


def compute(lead: tuple, n: int, k: int, device: str) -> tuple[te.Tensor, te.Tensor, te.Tensor]:
    """out[*lead, r] = sum over chunks c, fields f of dot4(acts[*lead, c, f], signed_field(word, f)).

    ``lead`` is (1,) for the GEMV and (tiles, token_tile) for the GEMM. The word is one load
    per chunk shared by its four fields (nvcc keeps it in a register)."""
    if device not in DOT4:
        raise ValueError(f"device {device!r} is not one of {DEVICES}")
    dot4 = DOT4[device]
    acts = te.placeholder((*lead, k // CHUNK, 4), "int32", name="acts")
    packed = te.placeholder((n // ROWS, k // CHUNK, ROWS), "uint32", name="packed")
    c = te.reduce_axis((0, k // CHUNK), "c")

    def row(*index):
        *t, r = index
        word = packed[r // ROWS, c, r % ROWS]
        terms = [dot4(acts[(*t, c, f)], signed_field(word, f)) for f in range(4)]
        return te.sum(terms[0] + terms[1] + terms[2] + terms[3], axis=c)

    out = te.compute((*lead, n), row, name="out")
    return acts, packed, out


# ----------------------------------------------------------------------------- schedules


def schedule_gemv(func: tvm.tirx.PrimFunc, knobs: GpuGemvKnobs) -> tvm.s_tir.Schedule:
    """Rows over blocks and threadIdx.y; chunks interleaved over threadIdx.x (c = step *
    k_split + lane, so a warp reads consecutive chunks) and summed across the lanes."""
    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("out")
    t, r, c = sch.get_loops(out)
    block, row = sch.split(r, [None, knobs.rows_per_block])
    step, lane = sch.split(c, [None, knobs.k_split])
    sch.reorder(block, row, t, step, lane)
    sch.bind(block, "blockIdx.x")
    sch.bind(row, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")
    return sch


def schedule_gemm(func: tvm.tirx.PrimFunc, knobs: GpuGemmKnobs) -> tvm.s_tir.Schedule:
    """One row per thread, token_tile accumulators in registers (a local cache written back
    under the thread loop, so it compacts to token_tile ints), chunks serial, tokens unrolled
    innermost so each decoded word serves the whole tile."""
    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("out")
    local = sch.cache_write(out, 0, "local")
    tile, t, r, c = sch.get_loops(out)
    block, row = sch.split(r, [None, knobs.rows_per_block])
    sch.reorder(block, tile, row, c, t)
    sch.bind(block, "blockIdx.x")
    sch.bind(tile, "blockIdx.y")
    sch.bind(row, "threadIdx.x")
    sch.unroll(t)
    sch.decompose_reduction(out, c)
    sch.reverse_compute_at(local, row)
    sch.unroll(sch.get_loops(local)[-1])
    return sch


def _check_shape(n: int, k: int, knobs: GpuGemvKnobs | GpuGemmKnobs) -> None:
    if n % ROWS or n % knobs.rows_per_block or k % CHUNK:
        raise ValueError(f"unpadded shape n={n} k={k} for {knobs} (n a multiple of 16 and rows_per_block, k of 16)")


def build_primfunc(name: str, n_padded: int, k_padded: int, knobs: GpuGemvKnobs | GpuGemmKnobs, device: str) -> tvm.tirx.PrimFunc:
    """The named PrimFunc (GEMV or GEMM by the knobs' class): scheduled for ``cuda`` /
    ``metal``, unscheduled (serial loops, the same algebra) for ``cpu``. The GEMM takes tokens
    as [tiles, token_tile] like the CPU dot2 GEMM: the runtime pads a prompt to whole tiles
    (zero rows cost no correctness)."""
    knobs.check()
    gemv = isinstance(knobs, GpuGemvKnobs)
    _check_shape(n_padded, k_padded, knobs)
    lead = (1,) if gemv else (tirx.Var("tiles", "int64"), knobs.token_tile)
    func = te.create_prim_func(list(compute(lead, n_padded, k_padded, device)))
    if device != "cpu":
        func = (schedule_gemv if gemv else schedule_gemm)(func, knobs).mod["main"]
    return func.with_attr("global_symbol", name)


def launch(shape: dict, knobs: dict, gemv: bool) -> dict:
    """Grid and threadgroup sizes (x first) for the manifest; "tiles" is the GEMM's token tiles."""
    rows_per_block = knobs["rows_per_block"]
    blocks = shape["n_padded"] // rows_per_block
    if gemv:
        return {"grid": [blocks, 1], "threads": [knobs["k_split"], rows_per_block]}
    return {"grid": [blocks, "tiles"], "threads": [rows_per_block, 1]}


def make_case(shape: dict, knobs: dict, rng, tokens: int) -> Case:
    """GPU kernels run on a GPU only; their arithmetic is checked on the CPU by building them
    for device "cpu" (tests/test_gpu_kernels.py), not through a tuner case."""
    raise UserError("GPU kernels have no CPU test case: they are checked with the 'cpu' device build (tests) and verify on a GPU")


def build(name: str, shape: dict, knobs: dict, target: TargetSpec, gemv: bool) -> tvm.tirx.PrimFunc:
    typed = knobs_of(GpuGemvKnobs if gemv else GpuGemmKnobs, knobs)
    return build_primfunc(name, shape["n_padded"], shape["k_padded"], typed, target.isa)


OPERATORS = tuple(
    Operator(
        op, f"{op}-1", layout_dot2.VERSION, GPU_ISAS, space, kernel_shape, make_case, partial(build, gemv=gemv), reference,
        launch=partial(launch, gemv=gemv),
    )
    for op, space, gemv in (("gpu2_gemv", GEMV_SPACE, True), ("gpu2_gemm", GEMM_SPACE, False))
)  # fmt: skip
