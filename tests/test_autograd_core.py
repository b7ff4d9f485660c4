"""Gradients through inference-mode weights without copying them, and the model restored afterwards."""
import pytest
import torch

from z2i.guidance.autograd import autograd_parameters, normal_alias


def test_backward_through_inference_weights_then_restored():
    with torch.inference_mode():
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    before = {n: p for n, p in net.named_parameters()}
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        net(x).sum().backward()
    x.grad = None
    with autograd_parameters(net):
        aliases = {n: p for n, p in net.named_parameters()}
        g, = torch.autograd.grad(net(x).sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all()
    assert all(aliases[n].data_ptr() == before[n].data_ptr() for n in before)     # zero copy
    assert all(p is before[n] for n, p in net.named_parameters())                 # originals back


def test_alias_falls_back_to_a_copy_when_needed():
    with torch.inference_mode():
        t = torch.ones(3)
    a = normal_alias(t)
    assert not a.is_inference() and torch.equal(a, t)
