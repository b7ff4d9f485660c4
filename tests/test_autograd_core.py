"""Gradients through inference-mode weights without copying them, and the model restored afterwards."""
import pytest
import torch

from z2i.guidance.autograd import autograd_parameters, checkpointed, normal_alias, recomputing


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


class Layer(torch.nn.Module):
    """A layer that reads per-call state from a dict it is handed (as ComfyUI's transformer_options) and stores a
    capture (as Z2I's map stores), like the UNet layers a guided call checkpoints."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.captures = []

    def forward(self, x, options):
        h = torch.tanh(self.lin(x)) * options["scale"] * options["call"].row_gain
        if not recomputing():
            self.captures.append(h)
        return x + h


class Call:
    def __init__(self, row_gain):
        self.row_gain = row_gain

    def snapshot(self):
        return Call(self.row_gain)


def _run(layers, x):
    opts, call = {"scale": 1.0, "call": Call(1.0)}, Call(1.0)
    opts["call"] = call
    h = x
    for i, layer in enumerate(layers):
        opts["scale"] = 1.0 + i             # the host mutates its options between layers
        call.row_gain = 0.5 + i             # and a row-wise evaluation its per-call object
        h = layer(h, opts)
    caps = [c for layer in layers for c in layer.captures]
    return h, caps


def test_checkpointed_layers_give_the_same_gradient_and_capture_once():
    torch.manual_seed(0)
    layers = [Layer() for _ in range(3)]
    x = torch.randn(2, 6, requires_grad=True)
    out, caps = _run(layers, x)
    loss = out.square().sum() + sum(c.sum() for c in caps)
    g_plain, = torch.autograd.grad(loss, x)
    for layer in layers:
        layer.captures.clear()
    with checkpointed(layers):
        out, caps = _run(layers, x)
        loss = out.square().sum() + sum(c.sum() for c in caps)
        g_ckpt, = torch.autograd.grad(loss, x)
    assert len(caps) == 3 and all(len(layer.captures) == 1 for layer in layers)   # the recomputation stored nothing
    assert torch.equal(g_plain, g_ckpt)          # same ops on the frozen state: bit for bit
    assert all("forward" not in layer.__dict__ for layer in layers)               # the class's forward is back


def test_checkpointed_recomputes_instead_of_keeping_activations():
    layers = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
              for _ in range(4)]
    x = torch.randn(32, 64, requires_grad=True)

    def saved_bytes(ctx):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size() if t.requires_grad or t.grad_fn is not None else 0)
            return t
        with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = x
            for layer in layers:
                h = layer(h)
        return sum(total), h

    from contextlib import nullcontext
    plain, a = saved_bytes(nullcontext())
    with checkpointed(layers):
        ckpt, b = saved_bytes(nullcontext())
    assert torch.equal(a, b)
    assert ckpt < plain / 4, (ckpt, plain)     # activations inside the layers are not kept


def test_checkpointed_honours_when_grad_mode_and_an_existing_instance_forward():
    layer = Layer()
    own = layer.forward
    layer.forward = lambda x, options: own(x, options) * 1.0       # another pack's instance-level wrapper
    theirs = layer.forward
    calls = []
    x = torch.randn(1, 6, requires_grad=True)
    opts = {"scale": 1.0, "call": Call(1.0)}
    with checkpointed([layer], when=lambda x, options: calls.append(x.shape) or x.shape[0] > 1):
        layer(x, opts)                             # when() says no: run as it is
        with torch.no_grad():
            layer(torch.randn(2, 6), opts)         # no gradients: not even asked
    assert calls == [torch.Size([1, 6])]
    assert layer.forward is theirs                 # their wrapper is put back


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_aliases_share_the_weights_memory_in_every_weight_dtype(dtype):
    """fp8 weights (UNETLoader weight_dtype fp8) are aliased without a copy too (issue 28): no second UNet in VRAM."""
    with torch.inference_mode():
        w = torch.randn(8, 8).to(dtype)
    a = normal_alias(w)
    assert not a.is_inference() and a.dtype == dtype and a.data_ptr() == w.data_ptr()
