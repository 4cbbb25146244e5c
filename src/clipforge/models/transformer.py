"""Transformer building blocks shared by both towers.

Attention runs through `F.scaled_dot_product_attention` with a fused q/k/v projection; LayerNorm
computes in fp32 whatever the activation dtype (half-precision stability, as in OpenAI CLIP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm that normalises half-precision inputs in fp32 and returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        w = self.weight if self.weight is None or self.weight.dtype == dtype else self.weight.to(dtype)
        b = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
        # In fp32 every cast here is a no-op (no copies).
        return F.layer_norm(x.to(dtype), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's checkpoints were trained with."""

    alpha = 1.702

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.alpha * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r} (expected 'quick_gelu' or 'gelu')")


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # rows: [q; k; v], as OpenAI's in_proj
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) views; SDPA takes the strides as they are
        if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
            # torch's CPU flash attention is 2x slower in bf16 than in fp32, its backward 4x: run it in fp32.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            y = y.to(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.act, QuickGELU):
            return self.proj(self.act(self.fc(x)))
        # QuickGELU(h) = silu(a h) / a with a = 1.702. The two scalings ride on the GEMMs (addmm's
        # alpha/beta), so the activation is one elementwise pass instead of three: the MLP is the
        # bulk of a Transformer's memory traffic on CPU. Same result up to float rounding.
        a = QuickGELU.alpha
        shape = x.shape
        h = torch.addmm(self.fc.bias, x.reshape(-1, shape[-1]), self.fc.weight.t(), beta=a, alpha=a)
        # silu's backward needs its input, so in place only when no graph is recorded.
        h = F.silu(h, inplace=not h.requires_grad)
        y = torch.addmm(self.proj.bias, h, self.proj.weight.t(), alpha=1 / a)
        return y.view(*shape[:-1], y.shape[-1])


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "quick_gelu"
    ) -> None:
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio, act) for _ in range(layers)])
        self.grad_checkpointing = False

    def init_weights(self) -> None:
        """OpenAI's text-transformer init (applied to both towers): std w^-0.5 for q/k/v,
        w^-0.5 (2L)^-0.5 for the output projections, (2w)^-0.5 for the MLP input."""
        w, n = self.width, len(self.blocks)
        proj_std = w**-0.5 * (2 * n) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=w**-0.5)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp.fc.weight, std=(2 * w) ** -0.5)
            nn.init.zeros_(block.mlp.fc.bias)
            nn.init.normal_(block.mlp.proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x
