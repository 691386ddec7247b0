"""Networks written the ways people write them (not the way our zoo does), for digits (1x8x8).

* :class:`TorchEncoderViT`: a transformer from PyTorch's own ``nn.TransformerEncoder``;
* :class:`TimmViT`: timm-style blocks with a fused ``qkv`` projection;
* :class:`MHAViT`: ``nn.MultiheadAttention`` used directly;
* :class:`MobileNetSE`: MobileNetV3-style inverted residuals with squeeze-and-excitation
  (the block's output multiplied by a gate).
"""

from __future__ import annotations

import torch
from torch import nn


class TorchEncoderViT(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, image_size=8, batch_first=True):
        super().__init__()
        dim, self.batch_first = 32, batch_first
        self.embed = nn.Conv2d(in_channels, dim, 2, 2)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // 2) ** 2, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        if not self.batch_first:
            t = t.transpose(0, 1)
        t = self.encoder(t)
        if not self.batch_first:
            t = t.transpose(0, 1)
        return self.head(t.mean(1))


class FusedAttention(nn.Module):
    """timm's ``Attention``: one ``qkv`` projection, split into q, k, v after a reshape."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(x)


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), FusedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, image_size=8):
        super().__init__()
        dim = 32
        self.embed = nn.Conv2d(in_channels, dim, 2, 2)
        self.blocks = nn.Sequential(TimmBlock(dim, 4), TimmBlock(dim, 4))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(t)).mean(1))


class MHAViT(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, image_size=8):
        super().__init__()
        dim = 32
        self.embed = nn.Conv2d(in_channels, dim, 2, 2)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        a, _ = self.attn(t, t, t, need_weights=False)
        t = self.norm(t + a)
        return self.head(torch.relu(self.fc(t)).mean(1))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeeze):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand=4, stride=1):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(),
        )
        self.se = SqueezeExcitation(hidden, max(8, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetSE(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, image_size=8):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()
        )
        self.blocks = nn.Sequential(MBConv(16, 16), MBConv(16, 24, stride=2), MBConv(24, 24))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
