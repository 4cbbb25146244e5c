"""Counting FLOPs of real calls: torch's FlopCounterMode plus CPU flash attention, which its table lacks.

    flops = count_flops(lambda: model.visual(pixels))                       # forward
    flops = count_flops(lambda: model(pixels, tokens).logit_scale.backward())  # forward + backward

2 x multiply-accumulates of matmuls, convolutions and attention; attention is counted with torch's own SDPA
formulas (full, non-causal attention, as the usual published GMAC figures do). Used by `clipforge plan`'s
tests and the benchmarks' MFU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def count_flops(fn: Callable[[], Any]) -> int:
    def forward(q, k, v, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: forward}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    return counter.get_total_flops()
