"""Attention through `scaled_dot_product_attention` for the duration of a separation.

HTDemucs's transformer calls `nn.MultiheadAttention` with `need_weights=False`. On CPU its native
kernel still materialises every attention matrix and multiplies with `bmm` (about a quarter of a
full-size model's time per segment here); `F.scaled_dot_product_attention` computes the same
thing with fused kernels (flash attention on CPU and CUDA), on the same weights. Measured with
full-size HTDemucs on this project's CPU: 10% less time per segment, 134 dB signal-to-difference
against the unfused model (`python benchmarks/attention.py`, benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class FusedAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` whose inference forward runs one fused attention kernel.

    Falls back to the parent for anything it does not cover: training, attention weights asked
    for, key padding masks, causal masks, separate key/value dimensions, bias_k/bias_v, zero attention.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (
            self.training
            or need_weights
            or key_padding_mask is not None
            or is_causal
            or not self.batch_first
            or not self._qkv_same_embed_dim
            or self.bias_k is not None
            or self.add_zero_attn
        ):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        batch, length, width = query.shape
        heads = self.num_heads
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (
            F.linear(x, w, b).view(batch, x.shape[1], heads, width // heads).transpose(1, 2)
            for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # True means "masked out" here, "may attend" for the fused kernel
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


@contextmanager
def fused_attention(model: nn.Module) -> Iterator[int]:
    """Route every `nn.MultiheadAttention` of `model` through `FusedAttention`, then put them back.

    Only the class changes: parameters, state dict and model signature stay as they are. Yields how
    many modules were switched.
    """
    switched = [module for module in model.modules() if type(module) is nn.MultiheadAttention]
    for module in switched:
        module.__class__ = FusedAttention
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__class__ = nn.MultiheadAttention
