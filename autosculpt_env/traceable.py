"""``torch.nn`` transformer modules rewritten as equivalent modules that ``torch.fx`` can see into.

``torch.fx`` treats every ``torch.nn`` module as a leaf, and the forward of
``nn.TransformerEncoderLayer`` would not trace anyway (its fast-path checks branch on
tensors). A transformer written with PyTorch's own layers would show the env nothing but its
patch embedding. :func:`make_traceable` replaces, in place, every

* ``nn.MultiheadAttention`` by :class:`MultiheadAttention`: the packed ``in_proj_weight``
  (or the separate ``q/k/v_proj_weight`` of ``kdim``/``vdim`` attention) becomes three
  ``nn.Linear`` layers ``q_proj``, ``k_proj``, ``v_proj``; ``out_proj`` is kept; attention
  is written out (``matmul``, ``softmax``) with the same masks, dropout and outputs;
* ``nn.TransformerEncoderLayer`` by :class:`TransformerEncoderLayer` (the same submodules,
  the slow path's arithmetic: pre- or post-norm, activation, dropouts);
* ``nn.TransformerEncoder`` by :class:`TransformerEncoder` (its layers and final norm).

The result computes the same function (tested to float32 rounding against the originals,
masks included) with the same parameters, so its attention projections are ordinary prunable
``Linear`` layers whose heads the env, the cost model and the materialiser understand
(:func:`autosculpt_env.patterns.attention_role`). Parameter names change accordingly
(``self_attn.in_proj_weight`` becomes ``self_attn.q_proj.weight`` ...): weights saved from a
pruned network load into ``make_traceable(architecture)``. Not supported (a clear
``TypeError``): ``add_bias_kv`` and ``add_zero_attn``. Decoder layers stay leaves (the graph
builder warns that their layers are not prunable).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn


@fx.wrap
def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    scores: torch.Tensor,
) -> torch.Tensor:
    """The float mask added to attention scores ``(N, H, L, S)`` (broadcastable to it).

    ``attn_mask`` is ``(L, S)`` or ``(N * H, L, S)``; ``key_padding_mask`` is ``(N, S)``; a
    bool mask is ``True`` where attention is not allowed, a float mask is added as is.
    """
    n, h, tgt, src = scores.shape
    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(
                attn_mask, float("-inf")
            )
        mask = attn_mask.reshape(n, h, tgt, src) if attn_mask.dim() == 3 else attn_mask
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            key_padding_mask = torch.zeros_like(key_padding_mask, dtype=scores.dtype).masked_fill(
                key_padding_mask, float("-inf")
            )
        padding = key_padding_mask.reshape(n, 1, 1, src)
        mask = padding if mask is None else mask + padding
    assert mask is not None, "called without a mask"
    return mask


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate ``q_proj``, ``k_proj``, ``v_proj`` layers and
    the attention written out, so that ``torch.fx`` sees every projection and matmul.

    Build it with :meth:`from_torch`; it takes and returns what ``nn.MultiheadAttention``
    does (``(output, weights or None)``), batched inputs only.

    Attributes:
        num_heads, head_dim: the head structure (the env prunes heads alike in q, k, v and
            the input columns of ``out_proj``; the materialiser lowers ``num_heads``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiheadAttention:
        """The equivalent of ``mha``, sharing no storage with it (weights copied).

        Raises:
            TypeError: ``mha`` uses ``add_bias_kv`` or ``add_zero_attn``.
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise TypeError(
                "nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be made "
                "traceable; keep it out of the graph with build_graph(..., leaf_modules=[...]) "
                "(its layers are then not pruned)"
            )
        e = mha.embed_dim
        new = cls(
            e,
            mha.num_heads,
            mha.kdim,
            mha.vdim,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
        )
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().split(e)
        with torch.no_grad():
            for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

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
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, src = query.size(0), query.size(1), key.size(1)
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, tgt, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, src, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, src, h, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        if attn_mask is not None or key_padding_mask is not None or is_causal:
            scores = scores + _additive_mask(attn_mask, key_padding_mask, is_causal, scores)
        weights = torch.softmax(scores, dim=-1)
        attended = F.dropout(weights, self.dropout, self.training)
        out = torch.matmul(attended, v).transpose(1, 2).reshape(n, tgt, h * d)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


class TransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer``'s arithmetic (its slow path) over the same submodules,
    with :class:`MultiheadAttention` as ``self_attn``. Build it with :meth:`from_torch`."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.self_attn = make_traceable(layer.self_attn)
        self.linear1, self.dropout, self.linear2 = layer.linear1, layer.dropout, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout1, self.dropout2 = layer.dropout1, layer.dropout2
        self.norm_first = layer.norm_first
        self.activation = layer.activation
        self.train(layer.training)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> TransformerEncoderLayer:
        return cls(layer)

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal) -> torch.Tensor:
        out = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout1(out)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` over traceable layers (no nested-tensor fast path)."""

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(make_traceable(layer) for layer in encoder.layers)
        self.norm = encoder.norm
        self.train(encoder.training)

    @classmethod
    def from_torch(cls, encoder: nn.TransformerEncoder) -> TransformerEncoder:
        return cls(encoder)

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        out = src
        for layer in self.layers:
            out = layer(
                out,
                src_mask=mask,
                src_key_padding_mask=src_key_padding_mask,
                is_causal=bool(is_causal),
            )
        return out if self.norm is None else self.norm(out)


REWRITES: dict[type, type] = {
    nn.TransformerEncoder: TransformerEncoder,
    nn.TransformerEncoderLayer: TransformerEncoderLayer,
    nn.MultiheadAttention: MultiheadAttention,
}
"""``torch.nn`` class -> its traceable equivalent (``from_torch`` builds one)."""


def make_traceable(model: nn.Module) -> nn.Module:
    """Replace every module of :data:`REWRITES` in ``model`` by its traceable equivalent.

    Works in place (on a network the caller owns; the env applies it to its private copy)
    and returns the model, or the replacement when ``model`` itself is such a module. A model
    with none of them is returned unchanged.
    """
    cls = REWRITES.get(type(model))
    if cls is not None:
        return cls.from_torch(model)
    for name, child in list(model.named_children()):
        new = make_traceable(child)
        if new is not child:
            setattr(model, name, new)
    return model
