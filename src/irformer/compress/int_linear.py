"""Real low-bit Linear layers on CPU: integer grid indices through an int8 matmul.

A fake-quantised :class:`~irformer.compress.methods.base.QuantLinear` computes
``crop(Q_a H) crop(W_q H)^T + b`` in floating point, where ``Q_a`` and ``W_q``
are the dequantised values in the (Hadamard-rotated, zero-padded to ``m``)
quantisation domain: ``Q_a = s_a I_a + z_a`` with integer indices ``I_a`` in
``[0, 2^b - 1]``, and ``W_q = M (s_o I_w + z_o)`` per output row ``o`` (its
bound group), ``M`` the pruning keep-mask. Since ``H`` is orthonormal,
``H E E^T H^T = I - G G^T`` with ``G`` the last ``m - n`` columns of ``H`` (none
without padding), so

    y = s_a s_o (I_a I_w^T) + s_a c_o (I_a M^T) + z_a s_o (1 I_w^T) + z_a c_o (1 M^T)
        - (Q_a G)(W_q G)^T + b,                              c_o = z_o (per row)

: one int8 x int8 -> int32 matmul (``torch._int_mm``) on the grid indices, a
rank-``(m - n + 1)`` float correction and per-output constants. The activation
indices come from the fused kernel (:func:`irformer.compress.fused.rotated_indices`:
rotate, round, clamp in one pass); 8-bit indices are shifted by 128 to fit int8
and the shift folded into the offsets. The result equals the fake-quantised
layer up to float rounding (same grid indices; products summed in another
order), so a model converted by :func:`integer_linears_` scores the same PSNR.
Everything else (attention operands, convolutions) is unchanged.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from irformer.compress.fused import fused_kernel_available, rotated_indices
from irformer.compress.hadamard import hadamard_matrix
from irformer.compress.methods.base import QuantLinear, SplitInputQuantLinear, quant_linears
from irformer.compress.quantizers import ActQuantizer

__all__ = ["IntegerLinear", "integer_linears_"]

logger = logging.getLogger(__name__)


def _offset(bits: int) -> int:
    """Index shift that makes ``b``-bit indices fit int8 (only 8 bits needs one)."""
    return 128 if bits == 8 else 0


class IntegerLinear(nn.Module):
    """The integer form of one :class:`QuantLinear` (same outputs up to float rounding).

    ``weight_indices``: (out, m) grid indices of the weight in its quantisation
    domain (e.g. from a packed file, :func:`irformer.compress.pack.read_packed_indices`);
    None computes them from the layer's FP weight and weight quantiser.
    """

    def __init__(self, ql: QuantLinear, weight_indices: Tensor | None = None) -> None:
        super().__init__()
        aq, wq = ql.act_quantizer, ql.weight_quantizer
        reason = unsupported_reason(ql)
        if reason:
            raise ValueError(f"no integer form for this layer: {reason}")
        self.in_features, self.out_features = ql.in_features, ql.out_features
        n = ql.in_features
        m = wq.rotate_size or n
        self.rotate_size = aq.rotate_size
        self.a_bits = aq.bits
        with torch.no_grad():
            s_a, z_a = (float(v) for v in aq.quantizer.scale_zero())
            if weight_indices is None:
                if ql.weight_prequantized:
                    raise ValueError(
                        "the layer's weight is already dequantised (a packed model): pass its "
                        "grid indices (irformer.compress.pack.read_packed_indices)"
                    )
                weight_indices = wq.indices(ql.weight.detach().float())
            idx = weight_indices.to(torch.int64).cpu()
            if tuple(idx.shape) != (self.out_features, m):
                raise ValueError(
                    f"weight indices of shape {tuple(idx.shape)}; expected {(self.out_features, m)}"
                )
            scale_g, zero_g = wq.quantizer.scale_zero()
            rows_per_group = self.out_features // wq.quantizer.groups
            s_o = scale_g.detach().float().cpu().repeat_interleave(rows_per_group)
            z_o = zero_g.detach().float().cpu().repeat_interleave(rows_per_group)
            mask = None if wq.mask is None else wq.mask.to(torch.bool).cpu()
            keep = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask
            off_w, off_a = _offset(wq.bits), _offset(aq.bits)
            # W_q = s_o J + c_o M with J = M (I_w - off_w): zero where pruned.
            j_int = torch.where(keep, idx - off_w, torch.zeros_like(idx))
            c_o = s_o * off_w + z_o
            # Q_a = s_a I' + z_a' with I' = I_a - off_a.
            z_a_eff = z_a + s_a * off_a
            w_q = (s_o[:, None] * j_int.double() + c_o[:, None] * keep.double()).double()
            blocks = [j_int.to(torch.int8)]
            if mask is not None:
                blocks.append(keep.to(torch.int8))
            self.register_buffer("weight_int", torch.cat(blocks).t().contiguous())
            self.pruned = mask is not None
            # Float side: T = I'.float() @ side (rowsum of I' unless pruned, and I' G).
            side = []
            coef = []
            if n < m:
                h = hadamard_matrix(m, dtype=torch.float64)
                g = h[:, n:]
            else:
                g = torch.zeros(m, 0, dtype=torch.float64)
            if mask is None:
                side.append(torch.ones(m, 1, dtype=torch.float64))
                coef.append((s_a * c_o.double())[None, :])
            wg = w_q @ g  # (out, m - n)
            side.append(g)
            coef.append(-s_a * wg.t())
            self.register_buffer("side", torch.cat(side, dim=1).float().contiguous())
            self.register_buffer("side_weight", torch.cat(coef, dim=0).float().contiguous())
            const = (
                z_a_eff * s_o.double() * j_int.sum(dim=1).double()
                + z_a_eff * c_o.double() * keep.sum(dim=1).double()
                - z_a_eff * (g.sum(dim=0, keepdim=True) @ wg.t())[0]
            )
            if ql.bias is not None:
                const = const + ql.bias.detach().double().cpu()
            self.register_buffer("const", const.float())
            self.register_buffer("scale_int", (s_a * s_o).float())
            self.register_buffer("scale_mask", (s_a * c_o).float())
        self.act_scale, self.act_zero = s_a, z_a

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        idx = rotated_indices(rows, self.act_scale, self.act_zero, self.a_bits, self.rotate_size)
        acc = torch._int_mm(idx, self.weight_int)  # (rows, out or 2 out) int32
        out = self.out_features
        y = torch.addmm(self.const, idx.float() @ self.side, self.side_weight)
        y.addcmul_(acc[:, :out].float(), self.scale_int)
        if self.pruned:
            y.addcmul_(acc[:, out:].float(), self.scale_mask)
        return y.view(*lead, out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"a_bits={self.a_bits}, rotate_size={self.rotate_size}, pruned={self.pruned}"
        )


def unsupported_reason(ql: QuantLinear) -> str | None:
    """Why ``ql`` has no integer form here (None: it has one)."""
    aq, wq = ql.act_quantizer, ql.weight_quantizer
    if isinstance(ql, SplitInputQuantLinear):
        return "it quantises its input three times (qkv_inputs='split')"
    if wq.official_pruning:
        return "its weight is pruned by prune_mode 'official' (a new mask every forward)"
    if not isinstance(aq, ActQuantizer):
        return f"its input quantiser is a {type(aq).__name__} (not uniform per tensor)"
    if aq.noise is not None:
        return "its input quantiser adds NoisyQuant noise"
    if aq.mode != "quant":
        return f"its input quantiser is in {aq.mode!r} mode, not calibrated"
    if not wq.calibrated:
        return "its weight quantiser is not calibrated"
    if (aq.rotate_size or ql.in_features) != (wq.rotate_size or ql.in_features):
        return "weights and inputs are quantised in domains of different sizes"
    if ql.out_features % wq.quantizer.groups:
        return "output rows do not divide into the weight's bound groups"
    return None


def integer_linears_(
    model: nn.Module, weight_indices: dict[str, Tensor] | None = None
) -> list[str]:
    """Replace, in place, every quantised Linear that has an integer form by an
    :class:`IntegerLinear`; returns their names (the others stay fake-quantised and
    are logged). ``weight_indices``: per layer name, e.g. from a packed file."""
    if not fused_kernel_available():
        raise RuntimeError("integer Linears need the fused kernel (irformer.compress.fused)")
    converted = []
    for name, ql in quant_linears(model):
        reason = unsupported_reason(ql)
        if reason:
            logger.info("%s stays fake-quantised: %s", name, reason)
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        indices = None if weight_indices is None else weight_indices[name]
        setattr(parent, attr, IntegerLinear(ql, indices))
        converted.append(name)
    return converted
