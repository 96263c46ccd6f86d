"""Layout lut4-v1 and the references the kernels are checked against."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet_runtime import layout, layout_dot2, layout_f16, layout_i8, reference
from bitnet_runtime.errors import UserError
from bitnet_runtime.memory import aligned_zeros, is_aligned


@pytest.mark.parametrize("rows", [32, 64])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 13), (64, 256), (130, 1000)])
def test_pack_unpack_roundtrip(rows, n, k):
    w = np.random.default_rng(n + k).integers(-1, 2, (n, k), dtype=np.int8)
    packed = layout.pack_ternary(w, rows, 32)
    n_p, k_p = layout.padded_shape(n, k, rows, 32)
    assert packed.shape == (n_p // rows, k_p // 4, rows // 16, 2, 8) and packed.dtype == np.uint8
    full = layout.unpack_ternary(packed)
    np.testing.assert_array_equal(full[:n, :k], w)
    assert not full[n:].any() and not full[:, k:].any()


def test_row_order_inside_a_block():
    """Row h*rows/2 + l*8 + i sits at byte l*16 + h*8 + i (where vpunpck puts its word)."""
    rows = 64
    w = np.zeros((rows, 4), np.int8)
    w[33, 0] = 1  # h=1, l=0, i=1 -> byte 0*16 + 8 + 1 = 9
    block = layout.pack_ternary(w, rows, 1)[0, 0].reshape(-1)
    assert np.flatnonzero(block).tolist() == [9] and block[9] == 0b0001


def test_byte_encoding_masks():
    w = np.array([[1, -1, 0, 1]], np.int8)
    byte = layout.pack_ternary(w, 32, 1).reshape(-1)[0]
    assert byte == 0b0010_1001  # +1 mask 1001 in the low nibble, -1 mask 0010 in the high nibble


@pytest.mark.parametrize("bad", [np.array([[0, 2]]), np.array([[0.5, 1.0]]), np.zeros((2, 2, 2)), np.array([["a"]])])
def test_non_ternary_weights_are_refused(bad):
    with pytest.raises(UserError):
        layout.pack_ternary(bad, 32, 32)


def test_references_agree_with_plain_arithmetic():
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (3, 16), dtype=np.int8)
    tables = reference.lut_tables(q)
    entries = (tables[:, :, 1].astype(np.int16) << 8) | tables[:, :, 0].view(np.uint8).astype(np.int16)
    for e in range(16):
        subset = [t for t in range(4) if e >> t & 1]
        np.testing.assert_array_equal(entries[:, 1, e], q[:, [4 + t for t in subset]].astype(np.int16).sum(1))
    x = np.array([[0.1, -0.2, 0.05]], np.float32)
    qx, scale = reference.quantize_activations(x)
    assert qx.tolist() == [[64, -127, 32]] and scale[0] == np.float32(127) / np.float32(0.2)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 13), (64, 256), (130, 1000)])
def test_dot2_pack_unpack_roundtrip(n, k):
    w = np.random.default_rng(n + k).integers(-1, 2, (n, k), dtype=np.int8)
    n_p, k_p = layout_dot2.padded_shape(n, k, 4, 2)
    assert n_p % 64 == 0 and k_p % 32 == 0
    packed = layout_dot2.pack_ternary(w, n_p, k_p)
    assert packed.shape == (n_p // 16, k_p // 16, 16, 4) and packed.dtype == np.uint8
    full = layout_dot2.unpack_ternary(packed)
    np.testing.assert_array_equal(full[:n, :k], w)
    assert not full[n:].any() and not full[:, k:].any()


def test_dot2_field_order():
    """Bits 2f..2f+1 of byte j of row i hold w[i, 16c + 4f + j] + 1."""
    w = np.zeros((16, 16), np.int8)
    w[3, 4 * 2 + 1] = 1  # row 3, field 2, byte 1 -> (1 + 1) << 4 over the other fields' 1s
    byte = layout_dot2.pack_ternary(w, 16, 16)[0, 0, 3, 1]
    assert byte == 0b01_10_01_01


def _fill(value):
    """A stand-in kernel that writes ``value`` to its last argument (the output)."""
    return lambda *args: args[-1].fill(value)


@pytest.mark.parametrize("tokens", [1, 3])
def test_binds_give_the_kernels_aligned_views_of_their_buffers(tokens):
    """Each layout's calling convention on stand-in kernels: the arguments are 64-byte aligned
    views of one set of buffers, q is zero where it pads, and ``run`` returns the rows the
    kernel wrote. ``args`` alone (no kernels) is what a case builder or benchmark times."""
    lut = layout.bind({"lut_table": _fill(1), "gemv": _fill(5), "gemm": _fill(6)}, {"n_padded": 64, "k_padded": 128, "rows": 32}, tokens)
    assert lut.q.shape == (tokens, 128) and not lut.q.any()
    assert (lut.run(np.zeros(1, np.uint8)) == (5 if tokens == 1 else 6)).all() and (lut.tables == 1).all()
    assert lut.out.shape == (tokens, 64) and np.shares_memory(lut.out, lut.acc)

    params = {"n_padded": 64, "k_padded": 32, "token_tile": 4}
    packed = aligned_zeros((4, 2, 16, 4), np.uint8)
    for words in (False, True):
        dot2 = layout_dot2.bind({"gemv": _fill(5), "gemm": _fill(6)}, params, tokens, words)
        assert dot2.q.shape == (tokens, 32) and dot2.acts.nbytes == (1 if tokens == 1 else 4) * 32  # GEMM: a whole tile
        assert (dot2.run(packed) == (5 if tokens == 1 else 6)).all() and dot2.out.shape == (tokens, 64)
        assert all(is_aligned(a) for a in layout_dot2.bind({}, params, tokens, words).args(packed))
        assert dot2.args(packed)[1].dtype == (np.uint32 if words else np.uint8)

    f16 = layout_f16.bind({"gemv": _fill(2.5)}, {"n": 65, "k": 7})
    assert f16.x.shape == (1, 7) and (f16.run(np.zeros(1)) == 2.5).all() and f16.out.shape == (1, 128)
    i8 = layout_i8.bind({"gemv": _fill(9)}, {"n_padded": 128, "k_padded": 8})
    assert i8.q.shape == (1, 8) and (i8.run(np.zeros(1), np.zeros(1)) == 9).all() and i8.out.shape == (1, 128)
    assert [a.shape for a in i8.args(np.zeros(1), np.zeros(1))] == [(1, 2, 4), (1,), (1,), (2, 64)]
