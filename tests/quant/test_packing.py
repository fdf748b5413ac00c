"""Packing of int2/int4/int8 codes into bytes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusers_qalora.quant import (
    PerChannel,
    PerGroup,
    WeightQuantizer,
    dequantize,
    grouped_view,
    pack_codes,
    pack_int4,
    unpack_codes,
    unpack_int4,
)

SETTINGS = settings(max_examples=100, deadline=None)


def code_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


# -- byte layout -------------------------------------------------------------------------------------------------


def test_int4_layout_low_nibble_first():
    assert pack_codes(torch.tensor([1, 2, 3, 4]), 4, signed=False).tolist() == [0x21, 0x43]
    assert pack_codes(torch.tensor([15, 0, 0, 15]), 4, signed=False).tolist() == [0x0F, 0xF0]
    # signed: two's complement in the nibble (-1 -> 0xF, -8 -> 0x8)
    assert pack_codes(torch.tensor([-1, 7, -8, 0]), 4, signed=True).tolist() == [0x7F, 0x08]
    assert pack_int4(torch.tensor([[1, 2], [-2, 3]], dtype=torch.int8)).tolist() == [[0x21], [0x3E]]


def test_int2_and_int8_layout():
    assert pack_codes(torch.tensor([0, 1, 2, 3]), 2, signed=False).tolist() == [0b11100100]
    assert pack_codes(torch.tensor([-2, -1, 0, 1]), 2, signed=True).tolist() == [0b01001110]
    assert pack_codes(torch.tensor([-1, 127, -128, 0]), 8, signed=True).tolist() == [255, 127, 128, 0]
    assert pack_codes(torch.tensor([0, 255, 7]), 8, signed=False).tolist() == [0, 255, 7]


def test_layout_along_dim0():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]])
    packed = pack_codes(codes, 4, signed=False, dim=0)
    assert packed.shape == (1, 3) and packed.dtype == torch.uint8
    assert packed.tolist() == [[0x41, 0x52, 0x63]]


def test_unpack_hand_example():
    packed = torch.tensor([0x7F, 0x08], dtype=torch.uint8)
    assert unpack_codes(packed, 4, signed=True).tolist() == [-1, 7, -8, 0]
    assert unpack_codes(packed, 4, signed=False).tolist() == [15, 7, 8, 0]
    assert unpack_int4(packed).tolist() == [-1, 7, -8, 0]
    assert unpack_codes(torch.tensor([0b01001110], dtype=torch.uint8), 2, signed=True).tolist() == [-2, -1, 0, 1]


# -- round trips -------------------------------------------------------------------------------------------------


@st.composite
def packing_case(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    signed = draw(st.booleans())
    per_byte = 8 // bits
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 5)) for _ in range(ndim)]
    shape[dim] = per_byte * draw(st.integers(1, 4))
    lo, hi = code_range(bits, signed)
    n = math.prod(shape)
    values = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.int16] + ([torch.int8] if signed else [torch.uint8])))
    if dtype == torch.uint8 or (dtype == torch.int8 and not signed):
        dtype = torch.int16
    return bits, signed, dim, torch.tensor(values, dtype=dtype).reshape(shape)


@SETTINGS
@given(packing_case())
def test_pack_unpack_round_trip(case):
    bits, signed, dim, codes = case
    per_byte = 8 // bits
    packed = pack_codes(codes, bits, signed, dim)
    assert packed.dtype == torch.uint8
    expected_shape = list(codes.shape)
    expected_shape[dim] //= per_byte
    assert list(packed.shape) == expected_shape
    out = unpack_codes(packed, bits, signed, dim)
    assert out.shape == codes.shape
    assert out.dtype == (torch.uint8 if bits == 8 and not signed else torch.int8)
    assert torch.equal(out.to(torch.int64), codes.to(torch.int64))
    # packing along ``dim`` is packing the last dim of the moved tensor
    moved = pack_codes(codes.movedim(dim, -1).contiguous(), bits, signed, -1).movedim(-1, dim)
    assert torch.equal(packed, moved)


@SETTINGS
@given(packing_case())
def test_pack_matches_reference_bytes(case):
    bits, signed, dim, codes = case
    per_byte = 8 // bits
    flat = codes.movedim(dim, -1).reshape(-1, codes.shape[dim]).to(torch.int64).tolist()
    packed = pack_codes(codes, bits, signed, dim).movedim(dim, -1).reshape(len(flat), -1).tolist()
    mask = 2**bits - 1
    for row, prow in zip(flat, packed):
        expected = [
            sum((row[i * per_byte + j] & mask) << (j * bits) for j in range(per_byte))
            for i in range(len(row) // per_byte)
        ]
        assert prow == expected


def test_unsigned_int4_round_trip_full_range():
    codes = torch.arange(16).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(codes, signed=False), signed=False).long(), codes)
    codes = torch.arange(-8, 8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(codes)).long(), codes)


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
def test_odd_size_raises(bits):
    per_byte = 8 // bits
    with pytest.raises(ValueError, match=f"multiple of {per_byte}"):
        pack_codes(torch.zeros(3, per_byte + 1, dtype=torch.int8), bits)
    with pytest.raises(ValueError, match=f"multiple of {per_byte}"):
        pack_codes(torch.zeros(per_byte + 1, 4, dtype=torch.int8), bits, dim=0)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor(1, dtype=torch.int8), bits)


@pytest.mark.parametrize(
    "bits,signed,bad",
    [
        (4, True, 8),
        (4, True, -9),
        (4, False, 16),
        (4, False, -1),
        (2, True, 2),
        (2, False, 4),
        (8, True, 128),
        (8, False, 256),
        (8, False, -1),
    ],
)
def test_out_of_range_codes_raise(bits, signed, bad):
    per_byte = 8 // bits
    codes = torch.zeros(2 * per_byte, dtype=torch.int32)
    codes[1] = bad
    with pytest.raises(ValueError, match="must lie in"):
        pack_codes(codes, bits, signed)


@pytest.mark.parametrize("bits", [1, 3, 5, 6, 7, 16])
def test_unpackable_bits_raise_naming_argument_and_allowed_values(bits):
    with pytest.raises(ValueError, match=r"`bits`.*\(2, 4, 8\)"):
        pack_codes(torch.zeros(8, dtype=torch.int8), bits)
    with pytest.raises(ValueError, match=r"`bits`.*\(2, 4, 8\)"):
        unpack_codes(torch.zeros(8, dtype=torch.uint8), bits)


def test_wrong_dtypes_raise():
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.zeros(4), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(torch.zeros(4, dtype=torch.int8), 4)


# -- with the weight quantizer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (2, True), (8, False)])
@pytest.mark.parametrize("gran", [PerChannel(), PerGroup(4)], ids=str)
def test_weight_codes_survive_packing(bits, symmetric, gran):
    w = torch.randn(8, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    wq = WeightQuantizer(w.shape, bits=bits, symmetric=symmetric, granularity=gran)
    wq.initialize_(w, "mse")
    codes = wq.quantize(w)
    for dim in (0, 1):
        packed = pack_codes(codes, bits, signed=symmetric, dim=dim)
        restored = unpack_codes(packed, bits, signed=symmetric, dim=dim)
        assert torch.equal(restored.to(torch.int32), codes)
    deq = dequantize(grouped_view(restored, gran), wq.step.detach(), wq.zero_point).reshape(w.shape)
    assert torch.equal(deq, wq(w).detach())
