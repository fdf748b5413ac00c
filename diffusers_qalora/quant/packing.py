"""Packing of low-bit integer codes into bytes: two 4-bit or four 2-bit codes per ``uint8``.

Codes are packed along one dimension, lowest bits first: for 4 bits, element ``2i`` goes to the low nibble of byte
``i`` and element ``2i + 1`` to the high nibble.  Signed codes are stored in two's complement within their field.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4, 8)


def _check(bits: int, signed: bool) -> tuple[int, int, int]:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"`bits` must be one of {PACKABLE_BITS} for packing, got {bits!r}.")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return 8 // bits, lo, hi


def pack_codes(codes: torch.Tensor, bits: int, signed: bool = True, dim: int = -1) -> torch.Tensor:
    """Pack integer ``codes`` (any integer dtype, values in the ``bits``-bit range) into ``uint8`` along ``dim``.

    The size of ``dim`` must be a multiple of ``8 // bits``; the result has that dim divided by ``8 // bits``.
    """
    per_byte, lo, hi = _check(bits, signed)
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"`codes` must be an integer tensor, got {codes.dtype}.")
    dim = dim % codes.dim() if codes.dim() else 0
    if codes.dim() == 0 or codes.shape[dim] % per_byte:
        raise ValueError(
            f"dim {dim} of `codes` (shape {tuple(codes.shape)}) must be a multiple of {per_byte} to pack {bits}-bit "
            f"codes; pad it first."
        )
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"`codes` must lie in [{lo}, {hi}] for {bits}-bit {'signed' if signed else 'unsigned'} codes.")
    if bits == 8:
        return codes.to(torch.int16).bitwise_and(0xFF).to(torch.uint8)
    fields = codes.to(torch.int16).bitwise_and(2**bits - 1)  # two's complement within the field
    moved = fields.movedim(dim, -1)
    moved = moved.reshape(*moved.shape[:-1], moved.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int16) * bits
    packed = (moved << shifts).sum(dim=-1)
    return packed.to(torch.uint8).movedim(-1, dim)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool = True, dim: int = -1) -> torch.Tensor:
    """Inverse of [pack_codes][diffusers_qalora.quant.pack_codes]: ``uint8`` bytes to ``int8`` codes (``uint8`` for unsigned 8-bit codes), with
    ``dim`` multiplied by ``8 // bits``."""
    per_byte, _, _ = _check(bits, signed)
    if packed.dtype != torch.uint8:
        raise TypeError(f"`packed` must be a uint8 tensor, got {packed.dtype}.")
    if bits == 8:
        return packed.view(torch.int8).clone() if signed else packed.clone()
    dim = dim % packed.dim()
    moved = packed.movedim(dim, -1).to(torch.int16)
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int16) * bits
    fields = (moved.unsqueeze(-1) >> shifts).bitwise_and(2**bits - 1)
    if signed:
        fields = torch.where(fields >= 2 ** (bits - 1), fields - 2**bits, fields)
    fields = fields.reshape(*moved.shape[:-1], moved.shape[-1] * per_byte)
    return fields.to(torch.int8).movedim(-1, dim)


def pack_int4(codes: torch.Tensor, signed: bool = True, dim: int = -1) -> torch.Tensor:
    """Two 4-bit codes per byte; see [pack_codes][diffusers_qalora.quant.pack_codes]."""
    return pack_codes(codes, 4, signed, dim)


def unpack_int4(packed: torch.Tensor, signed: bool = True, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_int4`."""
    return unpack_codes(packed, 4, signed, dim)
