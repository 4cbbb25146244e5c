"""Image towers: VisionTransformer and ModifiedResNet (Radford et al. 2021, sec. 2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .transformer import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """ViT with a class token and an extra LayerNorm (`ln_pre`) after the position embeddings."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        w, g = cfg.width, cfg.grid_size
        self.patch_size = cfg.patch_size
        self.image_size = cfg.image_size
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.pos_embed = nn.Parameter(torch.empty(g * g + 1, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, embed_dim))

    def init_weights(self) -> None:
        scale = self.class_embedding.shape[0] ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        nn.init.normal_(self.proj, std=scale)
        nn.init.kaiming_uniform_(self.patch_embed.weight, a=5**0.5)
        self.transformer.init_weights()

    # Tower contract (models/towers.py).
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.blocks)

    def head(self) -> list[nn.Parameter]:
        return [*self.ln_post.parameters(), self.proj]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        """(N, 3, H, W) -> (N, embed_dim). `mask_ratio` > 0 drops that share of patch tokens at random
        (FLIP, Li et al. 2023); only used in training."""
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (N, w, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, w)
        if x.shape[1] + 1 != self.pos_embed.shape[0]:
            raise ValueError(
                f"image of {tuple(pixels.shape[-2:])} px gives {x.shape[1]} patches; this tower expects "
                f"{self.pos_embed.shape[0] - 1} (image_size {self.image_size})"
            )
        x = x + self.pos_embed[1:].to(x.dtype)
        if mask_ratio > 0:
            x = random_keep(x, 1.0 - mask_ratio)
        cls = (self.class_embedding + self.pos_embed[0]).to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + T, w)
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.ln_post(x[:, 0])
        return x @ self.proj.to(x.dtype)


def random_keep(x: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep a random subset of round(T * keep) tokens per sample. (N, T, C) -> (N, T', C)."""
    N, T, C = x.shape
    n_keep = max(1, round(T * keep))
    idx = torch.rand(N, T, device=x.device).argsort(dim=1)[:, :n_keep]
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))


class Downsample(nn.Module):
    """Anti-aliased shortcut: avgpool(stride) then 1x1 conv + BN (ResNet-D)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.pool(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # All convs have stride 1; striding happens by avgpool after the 3x3 conv (anti-aliasing).
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        need_down = stride > 1 or cin != planes * 4
        self.downsample = Downsample(cin, planes * 4, stride) if need_down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.pool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling whose single query is the mean of the spatial tokens (plus its position)."""

    def __init__(self, grid: int, width: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos_embed.to(x.dtype)  # (N, 1+HW, C)
        # Only the mean token's output is used, so only its query is computed (exact).
        hs = C // self.heads
        q = self.q_proj(x[:, :1]).view(N, 1, self.heads, hs).transpose(1, 2)  # (N, nh, 1, hs)
        k = self.k_proj(x).view(N, -1, self.heads, hs).transpose(1, 2)  # (N, nh, 1+HW, hs)
        v = self.v_proj(x).view(N, -1, self.heads, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (N, nh, 1, hs)
        return self.c_proj(y.transpose(1, 2).reshape(N, C))


def checkpoint_bn_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)` with its activations recomputed in the backward pass. The recomputation must not move
    BatchNorm running statistics a second time (momentum applied twice per step, `num_batches_tracked`
    counting double): its buffers are put back as the forward pass left them."""
    calls = 0

    def run(inp: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:  # the forward pass: updates the running statistics once, as without checkpointing
            return block(inp)
        kept = [(b, b.clone()) for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for b in m.buffers(recurse=False)]  # fmt: skip
        try:  # the same ops as the forward (checkpoint requires the same saved tensors)
            return block(inp)
        finally:  # also when checkpoint stops the recomputation early, from inside `block`
            with torch.no_grad():
                for buffer, value in kept:
                    buffer.copy_(value)

    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


class ModifiedResNet(nn.Module):
    """ResNet-D style: 3-conv stem with avgpool, anti-aliased strided blocks, attention pooling."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        w = cfg.width
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.stem_pool = nn.AvgPool2d(2)
        cin = w
        stages = []
        for i, depth in enumerate(cfg.layers):
            planes = w * 2**i
            blocks = [Bottleneck(cin, planes, stride=1 if i == 0 else 2)]
            cin = planes * 4
            blocks += [Bottleneck(cin, planes) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(cfg.image_size // 32, w * 32, cfg.heads, embed_dim)
        self.grad_checkpointing = False

    def init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity

    # Tower contract (models/towers.py). The blocks are the Bottlenecks of all four stages.
    def blocks(self) -> list[nn.Module]:
        return [b for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for b in stage]

    def head(self) -> list[nn.Parameter]:
        return list(self.attnpool.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, pixels: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
        if mask_ratio > 0:
            raise ValueError("patch masking (mask_ratio > 0) needs a ViT image tower")
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"image of {tuple(pixels.shape[-2:])} px; this tower expects image_size {self.image_size} "
                "(its attention pool has a position embedding per cell of the final feature map)"
            )
        # channels_last (NHWC) is oneDNN's native conv layout on CPU (~10% faster for RN50) and suits
        # tensor cores on GPU; the layout propagates through every conv/BN/pool. Same values.
        x = pixels.to(dtype=self.conv1.weight.dtype, memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.stem_pool(F.relu(self.bn3(self.conv3(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                # every block, the stage's last included (checkpoint_sequential leaves its last segment out)
                for block in stage:
                    x = checkpoint_bn_block(block, x)
            else:
                x = stage(x)
        return self.attnpool(x)
