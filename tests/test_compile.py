"""train.compile: a compiled training step gives the eager step's loss and gradients (the towers compiled
in place, so state-dict keys and checkpoints are unchanged)."""

from __future__ import annotations

import copy

import pytest
import torch

from clipforge.models import create_model
from clipforge.models.compile import compile_towers, compile_unavailable
from clipforge.train.global_loss import DistributedLoss
from clipforge.train.step import make_step_fn


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # dynamo capture + AOTAutograd, no code generation: fast
        pytest.param("inductor", marks=[pytest.mark.heavy, pytest.mark.timeout(1800), pytest.mark.skipif(
            compile_unavailable() is not None, reason=f"{compile_unavailable()}")]),  # generated C++ kernels
    ],
)  # fmt: skip
def test_compiled_step_matches_eager_loss_and_gradients(backend):
    torch.manual_seed(0)
    eager = create_model("tiny-vit")
    compiled = copy.deepcopy(eager)
    assert compile_towers(compiled, backend=backend) is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # keys unchanged: checkpoints compatible
    size, ctx = eager.config.vision.image_size, 16
    batch = {"image": torch.randn(8, 3, size, size), "text": torch.randint(1, 49000, (8, ctx))}
    batch["text"][:, -1] = 49407  # EOT
    step = make_step_fn(DistributedLoss("clip"))
    losses, grads = [], []
    for m in (eager, compiled):
        m.zero_grad()
        losses.append(step(m, batch, step=0, backward=lambda loss: loss.backward()))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_unavailable_compile_says_why(monkeypatch):
    import clipforge.models.compile as mod

    monkeypatch.setattr(mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: False)
    model = create_model("tiny-vit")
    assert "C++ compiler" in compile_towers(model)
    assert not hasattr(model.visual, "_compiled_call_impl") or model.visual._compiled_call_impl is None
