"""Gradients through a model whose weights were loaded under torch.inference_mode (every ComfyUI node runs
there, so checkpoint weights are inference tensors and "cannot be saved for backward";
shared/design/comfyui-internals.md section 3).

`autograd_parameters(*modules)` swaps each inference-tensor parameter and buffer for a normal tensor for the
duration of a `with` block and puts the original objects back afterwards, so the shared model is left exactly
as it was. The normal tensor is a zero-copy alias of the same memory made through DLPack (a tensor rebuilt
from raw storage carries no inference flag), so no weight is copied (fp8 included; a dtype DLPack cannot carry is
aliased through a byte view, and copied only when that fails too). The aliases are never written to. Use it around a whole guided run, not per step, over
every network the guided call runs (nodes._host.guided_networks finds them in a sampling run).
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
import torch.utils.checkpoint


def normal_alias(t: torch.Tensor) -> torch.Tensor:
    """A non-inference tensor sharing t's memory. Through DLPack (fp8 included on torch 2.14); a dtype DLPack cannot
    carry goes through a byte view of the same memory (still no copy); a copy only when neither works."""
    for view in (lambda a: a, lambda a: a.view(torch.uint8)):
        try:
            alias = torch.from_dlpack(view(t.detach()))
            if alias.dtype != t.dtype:
                alias = alias.view(t.dtype)
            if alias.data_ptr() == t.data_ptr() and not alias.is_inference():
                return alias
        except (RuntimeError, TypeError, BufferError):
            continue
    with torch.inference_mode(False):
        return t.detach().clone()


_ALIASING = [0]         # how many autograd_parameters blocks are open (aliasing_active)


def aliasing_active() -> bool:
    """True while some network's weights are swapped for aliases (inside autograd_parameters). Nothing may load or
    offload models then: the memory manager would move the originals while the aliases keep the old memory alive
    (nodes._guided loads every network a guided run needs before it aliases)."""
    return _ALIASING[0] > 0


@contextmanager
def autograd_parameters(*modules: torch.nn.Module):
    """Every inference-tensor parameter and buffer of `modules` (and their submodules, each once) aliased by a
    normal tensor inside the block, the original objects put back afterwards. Give it every network the guided
    call runs: the UNet and what the conditioning or the patches bring (control models, GLIGEN, adapters), and
    the helper models a loss runs (VAE, open_clip), all loaded first: the memory manager's device move happens
    under inference mode and makes every weight it moves an inference tensor."""
    swapped, seen = [], set()
    _ALIASING[0] += 1
    try:
        with torch.inference_mode(False):
            for m in (sub for module in modules if module is not None for sub in module.modules()):
                if id(m) in seen:
                    continue
                seen.add(id(m))
                for name, p in list(m._parameters.items()):
                    if p is not None and p.is_inference():
                        m._parameters[name] = torch.nn.Parameter(normal_alias(p), requires_grad=False)
                        swapped.append((m._parameters, name, p))
                for name, b in list(m._buffers.items()):
                    if b is not None and b.is_inference():
                        m._buffers[name] = normal_alias(b)
                        swapped.append((m._buffers, name, b))
        yield modules[0] if len(modules) == 1 else modules
    finally:
        _ALIASING[0] -= 1
        for table, name, original in reversed(swapped):
            table[name] = original


@contextmanager
def checked_backward(check):
    """Inside the block, tensors saved for a backward pass get an unpack hook that calls check() each time the
    backward pass takes one back (check raises to stop it: ComfyUI's Cancel). A forward is interruptible between
    ops (ComfyUI's ops check the flag), a backward pass would otherwise run to its end: through a large UNet that
    is as long as the forward. Layers checkpointed by torch.utils.checkpoint keep their own hooks (their
    recomputation runs the checked forward)."""
    def unpack(t):
        check()
        return t

    # pack returns a detached view (same memory, same version counter): the tensor itself would keep its grad_fn,
    # and for an op's own output that node holds what it saved, a reference cycle only the cyclic gc frees, so
    # each step's graph would outlive the step
    with torch.autograd.graph.saved_tensors_hooks(torch.Tensor.detach, unpack):
        yield


# --- gradients through half-precision networks ----------------------------------------------------------------------

class LossScaler:
    """Dynamic loss scaling for gradients through a network that computes in fp16 (one per guided run; the scale
    is carried from step to step as torch.amp.GradScaler carries it).

    The guidance losses are small: their gradients inside an fp16 UNet sit near or below fp16's smallest normal
    number (6.1e-5), where they lose precision or flush to zero. The loss is multiplied by `scale` before the
    backward pass, so every gradient inside the network is `scale` times larger, and the result is divided by it
    in fp32. An overflow (a non-finite gradient) divides the scale by `backoff` and redoes the backward pass over
    the same graph; `growth_interval` clean passes in a row double it. Disabled (fp32, bf16: fp32's exponent
    range), it is torch.autograd.grad / backward with no check and no host synchronisation; enabled, one
    synchronisation per backward pass reads the overflow check."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 14, backoff: float = 8.0, growth_interval: int = 4,
                 max_scale: float = 2.0 ** 24, retries: int = 12):
        self.enabled, self.scale = bool(enabled), float(init_scale) if enabled else 1.0
        self.backoff, self.growth_interval, self.max_scale, self.retries = backoff, growth_interval, max_scale, retries
        self.clean, self.overflows, self.passes = 0, 0, 0

    @staticmethod
    def for_dtypes(*dtypes) -> "LossScaler":
        """Enabled when any network of the guided call computes in fp16 (or an fp8 type, cast to fp16 per layer)."""
        return LossScaler(any(d is not None and (d == torch.float16 or "float8" in str(d)) for d in dtypes))

    def _finite(self, grads) -> bool:
        return bool(torch.stack([torch.isfinite(g).all() for g in grads if g is not None]).all())

    def _after(self, ok: bool) -> None:
        if ok:
            self.clean += 1
            if self.clean >= self.growth_interval:
                self.scale, self.clean = min(self.scale * 2.0, self.max_scale), 0
        else:
            self.overflows, self.clean = self.overflows + 1, 0
            self.scale /= self.backoff

    def _loss_ok(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            raise FloatingPointError("the guidance loss is not finite (the forward pass overflowed in half "
                                     "precision); run the model in fp32 or bf16 (ModelComputeDtype)")

    def grad(self, loss: torch.Tensor, inputs) -> list:
        """torch.autograd.grad(loss, inputs) as fp32 tensors, scaled as the class says."""
        single = isinstance(inputs, torch.Tensor)
        inputs = [inputs] if single else list(inputs)
        if not self.enabled:
            self.passes += 1
            out = list(torch.autograd.grad(loss, inputs))
            return out[0] if single else out
        self._loss_ok(loss)
        for attempt in range(self.retries):
            self.passes += 1
            last = attempt == self.retries - 1
            grads = torch.autograd.grad(loss * self.scale, inputs, retain_graph=not last)
            ok = self._finite(grads)
            scale = self.scale
            self._after(ok)
            if ok:
                out = [g.float() / scale for g in grads]
                return out[0] if single else out
        raise FloatingPointError(f"the guidance gradient overflowed in half precision at every loss scale down to "
                                 f"{self.scale:g}")

    def backward(self, loss: torch.Tensor, params) -> None:
        """loss.backward() into the .grad of `params` (fp32 parameters, e.g. a trained direction), scaled as the
        class says; the .grad values left are the unscaled gradients."""
        params = [p for p in params if p.requires_grad]
        if not self.enabled:
            self.passes += 1
            loss.backward()
            return
        self._loss_ok(loss)
        for attempt in range(self.retries):
            self.passes += 1
            before = [None if p.grad is None else p.grad.clone() for p in params]
            last = attempt == self.retries - 1
            (loss * self.scale).backward(retain_graph=not last)
            added = [(p.grad if b is None else p.grad - b) for p, b in zip(params, before)]
            ok = self._finite([a for a in added if a is not None])
            scale = self.scale
            self._after(ok)
            for p, b, a in zip(params, before, added):
                if a is None:
                    continue
                p.grad = (a.float() / scale).to(p.dtype) + (0 if b is None else b) if ok else b
            if ok:
                return
        raise FloatingPointError(f"the training gradient overflowed in half precision at every loss scale down to "
                                 f"{self.scale:g}")


# --- activation checkpointing over the layers of a shared network --------------------------------------------------

_RECOMPUTING = contextvars.ContextVar("z2i_recomputing", default=False)


def recomputing() -> bool:
    """True while a checkpointed layer is being recomputed for the backward pass: captures (maps, features) skip
    storing, so a layer's second forward leaves no trace; controllers that rewrite maps (CSG's mixup) still apply,
    so the recomputed activations are the ones the forward made. Also true for any forward run while a backward
    pass is in progress (the host's own checkpointing: ComfyUI runs an MMDiT joint block under
    torch.utils.checkpoint when a "dit" block replace calls it), since only a recomputation runs then."""
    return _RECOMPUTING.get() or torch._C._current_graph_task_id() != -1


def freeze(value):
    """The per-call state a layer reads, as it is now, for its recomputation: dicts (ComfyUI's transformer_options,
    which the host mutates between layers: block, block_index, ...) are copied one level deep, and values with a
    `snapshot()` method (Z2I's per-call objects, e.g. the row a row-wise evaluation is on) are replaced by it."""
    if isinstance(value, dict):
        return {k: (v.snapshot() if hasattr(v, "snapshot") else v) for k, v in value.items()}
    return value.snapshot() if hasattr(value, "snapshot") else value


@contextmanager
def checkpointed(layers, when=None):
    """Activation checkpointing (torch.utils.checkpoint, non-reentrant) over each module of `layers` inside the
    block: while gradients are enabled, a layer keeps only its inputs for the backward pass and runs its forward
    again when the gradient reaches it, so a guided call holds about one layer's activations instead of the whole
    network's (one more forward of each layer per backward pass). Calls without gradients are untouched.

    The layers belong to a shared model: each gets an instance-level `forward` for the block only and gets its
    own back afterwards (an instance attribute another pack set is wrapped and put back too). The recomputation
    runs with the inputs frozen at forward time (`freeze`) and the global RNG state restored (torch's
    preserve_rng_state: random token merging draws the same), and torch checks that it saves tensors of the
    same shapes as the forward did. `when(*args, **kwargs)` (optional) says per call whether to checkpoint
    (e.g. only layers on large latents, where activations dominate memory); the others run as they are."""
    wrapped = []
    try:
        for layer in layers:
            had = "forward" in layer.__dict__
            original = layer.__dict__.get("forward")
            layer.forward = _checkpointing(layer.forward, when)
            wrapped.append((layer, had, original))
        yield
    finally:
        for layer, had, original in reversed(wrapped):
            if had:
                layer.forward = original
            else:
                del layer.forward


def _checkpointing(forward, when):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled() or (when is not None and not when(*args, **kwargs)):
            return forward(*args, **kwargs)
        frozen = [tuple(freeze(a) for a in args), {k: freeze(v) for k, v in kwargs.items()}]
        calls = []

        def fn(*a, **k):
            if not calls:
                calls.append(1)
                return forward(*a, **k)
            token = _RECOMPUTING.set(True)
            try:
                return forward(*frozen[0], **frozen[1])
            finally:
                _RECOMPUTING.reset(token)
                # the per-call objects can lead back to this graph (a capture store holding maps with their
                # grad_fn): let them go as soon as the recomputation is done rather than at the next gc
                frozen[:] = [(), {}]

        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run
