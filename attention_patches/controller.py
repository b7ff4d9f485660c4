"""One attention-controller protocol for capture, guidance and mixup, and the attn2 patch that drives it.

Design (shared/design/style-by-example.md rules 4 and 9; comfyui-internals.md sections 1.3-1.5):
- The patch function `attn2_replace` is a plain function (never deep-copied, never stateful). It reads a
  per-call `AttentionCall` from `extra_options[CALL_KEY]`; a sampler puts that object into a shallow copy of
  the model options for the one UNet call that needs it. With no call object it is plain attention.
- Controllers key everything by site (block, id, index from `extra_options`) and by the `cond_or_uncond`
  entry of each batch chunk, never by a running layer counter, so batched, chunked or reordered CFG calls
  stay correct.
- A `MapStore` holds the maps of the current step only (lockstep use) or of a bounded number of steps; its
  memory policy (which sites, dtype, which conds) is the user's choice. It counts how many steps it ever
  held at once, so tests can assert the bound.
- All per-run state lives in objects the sampler creates for that run: nothing survives into a clone of
  the MODEL, another graph or the next run.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..guidance.autograd import recomputing
from .probs import apply_probs, attention_probs, head_mean, match_tokens, split_heads
from .sites import Site

CALL_KEY = "z2i_attention_call"            # the AttentionCall for cross-attention (attn2)
SELF_CALL_KEY = "z2i_self_attention_call"   # the AttentionCall for self-attention (attn1)
COND_ORDER_KEY = "z2i_cond_order"           # {ComfyUI label: logical index} set by a Z2I paired call


def call_conds(options: dict) -> list:
    """The logical cond index of each batch chunk of a UNet call. ComfyUI labels the chunks with cond_or_uncond
    (0 cond, 1 uncond), which other patches (SAG, PAG, IPAdapter's uncond handling) read; a Z2I call labels its
    caption rows uncond and its edit rows cond, as core's CFG call does, and says in COND_ORDER_KEY which
    logical index (0 caption/source, 1 edit, as the guidance's stores are keyed) each label carries.
    Without that key the labels are the indices (core's own CFG call: 0 cond, 1 uncond)."""
    cou = list(options.get("cond_or_uncond") or [0])
    order = options.get(COND_ORDER_KEY)
    return [order.get(c, c) for c in cou] if order else cou


class AttentionController:
    """Sees every cross-attention map of a call; may return replacement maps.

    process(probs, site, cond_index, call) -> probs, for one batch chunk [b, heads, Nq, Nk] whose conditioning
    is `cond_index` (the chunk's logical index, call_conds: ComfyUI's cond_or_uncond mapped by a Z2I call's order).
    """

    # A controller that only reads the head-averaged map (probs.mean(1)) sets this and implements process_mean:
    # where every controller of a layer is such a reader, the patch computes that mean one head at a time and the
    # layer's output with the host's attention kernel, so a [b, heads, N, N] self-attention map at a large layer
    # is never held (N = 4096 at 512 px: 0.5 GB per map in fp32 for 8 heads, against 64 MB for the mean).
    head_mean_only = False
    # reads_qk: the controller only needs the layer's queries and keys (process_qk), e.g. to apply the head-averaged
    # map to a vector without building it; the layer's output then comes from the host's kernel
    reads_qk = False

    def process(self, probs: torch.Tensor, site: Site, cond_index: int, call: "AttentionCall") -> torch.Tensor:
        return probs

    def wants(self, site: Site, hw: tuple[int, int], call: "AttentionCall") -> bool:
        """Whether this controller needs the maps of `site` (a layer of hw = (h, w) query positions) in this call;
        a layer no controller wants runs plain attention, its maps never computed."""
        return True

    def process_mean(self, mean: torch.Tensor, site: Site, cond_index: int, call: "AttentionCall") -> None:
        """The head-averaged maps [b, Nq, Nk] (float32) of one batch chunk, for head_mean_only controllers."""


@dataclass
class AttentionCall:
    """What one UNet call should do with its cross-attention: the step it belongs to and the controllers."""

    step: int
    controllers: Sequence[AttentionController]
    sites: Optional[frozenset] = None        # None = every site
    latent_hw: Optional[tuple] = None        # (H, W) of the full latent; None = from the first layer's options.
    # When set, a UNet sub-call on another spatial size (an area-conditioned crop) runs plain attention.
    row: Optional[int] = None                # set while a row-wise evaluation runs image `row` of the batch alone

    def __deepcopy__(self, memo):           # ComfyUI 0.3.75 deep-copies model options: keep identity
        return self

    def snapshot(self) -> "AttentionCall":
        """This call as it is now (row included), for a checkpointed layer's recomputation
        (guidance.autograd.checkpointed); the controllers are shared."""
        return dataclasses.replace(self)


class MapStore:
    """Cross-attention maps keyed by (step, site, cond index), holding at most `max_steps` steps.

    sites: keep only these sites (None = all); conds: keep only these cond indices (None = all);
    dtype: storage dtype (float16 halves memory); keep_graph: keep the autograd graph (for guidance losses).
    """

    def __init__(self, sites: Optional[Iterable[Site]] = None, conds: Optional[Iterable[int]] = None,
                 dtype: torch.dtype = torch.float32, keep_graph: bool = False, max_steps: int = 1,
                 device: Optional[torch.device] = None):
        self.sites = frozenset(sites) if sites is not None else None
        self.conds = frozenset(conds) if conds is not None else None
        self.dtype, self.keep_graph, self.max_steps, self.device = dtype, keep_graph, max_steps, device
        self._steps: "OrderedDict[int, dict]" = OrderedDict()
        self.peak_steps = 0

    def __deepcopy__(self, memo):
        return self

    def wants(self, site: Site, cond_index: int) -> bool:
        return (self.sites is None or site in self.sites) and (self.conds is None or cond_index in self.conds)

    def put(self, step: int, site: Site, cond_index: int, probs: torch.Tensor) -> None:
        if not self.wants(site, cond_index) or recomputing():   # a checkpointed layer's second forward
            return
        if step not in self._steps:
            self._steps[step] = {}
            while len(self._steps) > self.max_steps:
                self._steps.popitem(last=False)
            self.peak_steps = max(self.peak_steps, len(self._steps))
        t = probs if self.keep_graph else probs.detach()
        t = t.to(dtype=self.dtype, device=self.device or t.device)
        key = (site, cond_index)
        maps = self._steps[step]
        maps[key] = torch.cat([maps[key], t]) if key in maps else t   # a cond split over several calls

    def step(self, step: int) -> dict:
        return self._steps.get(step, {})

    def get(self, step: int, site: Site, cond_index: int) -> Optional[torch.Tensor]:
        return self._steps.get(step, {}).get((site, cond_index))

    def drop(self, step: int) -> None:
        self._steps.pop(step, None)

    def clear(self) -> None:
        self._steps.clear()

    @property
    def steps_held(self) -> int:
        return len(self._steps)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for maps in self._steps.values() for t in maps.values())


class Capture(AttentionController):
    """Store the maps (capture mode; with keep_graph=True, for gradient guidance)."""

    def __init__(self, store: MapStore):
        self.store = store

    def process(self, probs, site, cond_index, call):
        self.store.put(call.step, site, cond_index, probs)
        return probs


def resize_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[B or 1, H, W] background mask -> [B or 1, 1, h*w, 1] at a layer's resolution (bilinear)."""
    m = F.interpolate(mask[:, None].float(), size=hw, mode="bilinear", align_corners=False)
    return m.reshape(m.shape[0], 1, hw[0] * hw[1], 1).clamp(0, 1)


EMPTY_OBJECT = 1e-6   # an object mask whose peak is at most this is all background (up to float rounding)


def renormalise_background(p: torch.Tensor) -> torch.Tensor:
    """P -> 1 - M / max(M) per image, M = 1 - P the object mask at one layer's resolution ([B, 1, hw, 1]).

    The authors' code (Hleephilip/CSG) divides the object mask by its maximum after resizing it to each
    layer (`new_mask /= new_mask.max()`), so the object's peak gets the target maps alone. Here the maximum
    is taken per image, so an image of a batch gets what it gets alone (their code runs one image). An image
    whose object mask is empty (peak <= EMPTY_OBJECT: all background) is left as it is.
    """
    obj = 1 - p
    peak = obj.flatten(1).amax(1).reshape(-1, *([1] * (obj.ndim - 1)))
    scaled = obj / peak.clamp_min(EMPTY_OBJECT)
    return torch.where(peak > EMPTY_OBJECT, 1 - scaled, p).clamp(0, 1)


class Mixup(AttentionController):
    """CSG cross-attention mixup (Eq. 13): M_tgt <- M_src * P + M_tgt * (1 - P), P the background probability
    resized to each layer.

    normalise=True (the default, the authors' code): P = 1 - M / max(M) per layer and per image, M = 1 - P the
    resized object mask, so the object's peak takes the target maps alone (renormalise_background).
    normalise=False: P as given, resized (the paper's Eq. 13 literally; max(M) is usually well below 1, so
    some source maps enter the object region). `strength` scales the P used for mixing (0 = target maps).

    `source` holds the source branch's maps of the same step (lockstep reference pass); `token_map[l]` is the
    source token matched to target token l (identity when None). Maps of sites or steps without source maps
    pass through unchanged.

    `current` (the authors' code, two UNet passes per step): the target maps M_tgt are not this call's own but
    those a first, unmixed pass of the same step captured (keyed by site and cond), so every layer mixes maps of
    hidden states no earlier mixing has changed; this call only injects the mix (its own maps are discarded).
    """

    def __init__(self, source: MapStore, mask: torch.Tensor, source_cond: int = 0,
                 token_map: Optional[torch.Tensor] = None, target_conds: Optional[Iterable[int]] = None,
                 normalise: bool = True, strength: float = 1.0, current: Optional[MapStore] = None):
        self.source, self.mask, self.source_cond, self.current = source, mask, source_cond, current
        self.token_map = token_map
        self.target_conds = frozenset(target_conds) if target_conds is not None else None
        self.normalise, self.strength = normalise, float(strength)
        self._p: dict = {}   # the layer masks of this run, by (h, w)
        self._taken: dict = {}   # rows of the first pass's maps already injected, by (step, site, cond)

    def next_step(self) -> None:
        """The two-pass form: forget this step's first-pass maps and how many rows of them were injected."""
        if self.current is not None:
            self.current.clear()
        self._taken.clear()

    def layer_mask(self, hw: tuple[int, int], device) -> torch.Tensor:
        """The mixing weight of the source maps at a layer of size hw: [B or 1, 1, h*w, 1]."""
        key = (tuple(hw), str(device))
        if key not in self._p:
            p = resize_mask(self.mask.to(device), hw)
            if self.normalise:
                p = renormalise_background(p)
            self._p[key] = p * self.strength if self.strength != 1 else p
        return self._p[key]

    def process(self, probs, site, cond_index, call):
        if self.target_conds is not None and cond_index not in self.target_conds:
            return probs
        src = self.source.get(call.step, site, self.source_cond)
        if src is None:
            return probs
        if self.current is not None:
            # the first pass made the same UNet calls in the same order (row by row, or another patch's extra call
            # such as Skip Layer Guidance's), each appending its rows: this call takes the next rows in order
            cur = self.current.get(call.step, site, cond_index)
            if cur is None:
                return probs
            key = (call.step, site, cond_index)
            start = self._taken.get(key, 0)
            cur = cur[start:start + probs.shape[0]]
            if cur.shape != probs.shape:
                raise RuntimeError(f"z2i: the first pass's maps at {site} are {tuple(cur.shape)}, this call's "
                                   f"{tuple(probs.shape)}")
            self._taken[key] = start + probs.shape[0]
            probs = cur.to(probs)
        src = src.to(probs)
        if self.token_map is not None:
            src = src[..., self.token_map.to(src.device)]
        if src.shape[-1] != probs.shape[-1]:        # prompts of different lengths (probs.match_tokens)
            src = match_tokens(src, probs.shape[-1], like=probs)
        row = call.row
        if row is not None and src.shape[0] > 1:          # one image of the batch evaluated alone
            src = src[row:row + 1]
        if src.shape[0] != probs.shape[0]:
            src = src.expand(probs.shape[0], -1, -1, -1) if src.shape[0] == 1 else src[:probs.shape[0]]
        hw = call_hw(call, probs.shape[2])
        p = self.layer_mask(hw, probs.device)
        if row is not None and p.shape[0] > 1:
            p = p[row:row + 1]
        if p.shape[0] != probs.shape[0]:
            p = p.expand(probs.shape[0], -1, -1, -1)
        return src * p + probs * (1 - p)


def call_hw(call: AttentionCall, n: int) -> tuple[int, int]:
    """The (h, w) of a layer with n query tokens, from the latent shape recorded on the call."""
    if call.latent_hw is None:
        side = int(round(n ** 0.5))
        return side, n // side
    H, W = call.latent_hw
    f = ((H * W) / n) ** 0.5
    h = max(1, int(round(H / f)))
    return h, n // h


def _sdpa(q, k, v, heads):
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    out = F.scaled_dot_product_attention(qh, kh, vh)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def attn2_replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """ComfyUI attn2 replace patch: plain attention, or maps handed to the call's controllers."""
    return _controlled_attention(q, k, v, extra_options, CALL_KEY)


def attn1_replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """ComfyUI attn1 replace patch (self-attention), driven by the call under SELF_CALL_KEY."""
    return _controlled_attention(q, k, v, extra_options, SELF_CALL_KEY)


def attn2_over(inner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """attn2 replace installed over another pack's attn2 replace `inner` (e.g. IPAdapter's) at the same layer.

    The rule: where Z2I only reads the maps (capture, pix2pix-zero/zeroCon guidance, masks, CSG's source pass),
    the controllers see the maps computed from q and k in fp32 and `inner` produces the layer's output, in
    guided and unguided calls alike. Where a controller rewrites the maps (CSG's mixup), the output must come
    from the rewritten maps, so `inner` is not called at that layer for that call; a warning names the layer
    (once per layer and call object)."""
    return _controlled_attention(q, k, v, extra_options, CALL_KEY, inner)


def over(existing):
    """The attn2 replace to install at a layer whose current replace is `existing` (None: none)."""
    if existing is None or existing is attn2_replace or (
            isinstance(existing, functools.partial) and existing.func is attn2_over):
        return attn2_replace if existing is None else existing
    return functools.partial(attn2_over, existing)


def hand_maps(maps: torch.Tensor, cou: list, controllers, site: Site, call: AttentionCall):
    """Each cond chunk of `maps` (ComfyUI's cond_or_uncond order) through every controller in turn ->
    (maps, changed): the chunks the controllers returned, concatenated, when any returned a new tensor."""
    chunks = list(maps.chunk(len(cou))) if len(cou) > 1 else [maps]
    changed = False
    for i, (cond_index, chunk) in enumerate(zip(cou, chunks)):
        for c in controllers:
            new = c.process(chunk, site, cond_index, call)
            if new is not chunk:
                chunk, changed = new, True
        chunks[i] = chunk
    if not changed:
        return maps, False
    return (torch.cat(chunks) if len(chunks) > 1 else chunks[0]), True


def hand_means(mean: torch.Tensor, cou: list, controllers, site: Site, call: AttentionCall) -> None:
    """Each cond chunk of head-averaged maps to every head_mean_only controller (process_mean)."""
    for cond_index, chunk in zip(cou, mean.chunk(len(cou))):
        for c in controllers:
            c.process_mean(chunk, site, cond_index, call)


def _controlled_attention(q, k, v, extra_options: dict, call_key: str, inner=None) -> torch.Tensor:
    heads = extra_options["n_heads"]
    call: Optional[AttentionCall] = extra_options.get(call_key)
    block = extra_options.get("block", ("?", -1))
    site = Site(block[0], int(block[1]), int(extra_options.get("block_index", 0)))
    plain = (lambda: inner(q, k, v, extra_options)) if inner is not None else (lambda: _sdpa(q, k, v, heads))
    if call is None or not call.controllers or (call.sites is not None and site not in call.sites):
        return plain()
    shape = extra_options.get("original_shape")
    if call.latent_hw is None and shape is not None:
        call.latent_hw = tuple(shape[-2:])
    elif shape is not None and tuple(shape[-2:]) != tuple(call.latent_hw):
        # an area-conditioned crop (ConditioningSetArea): its maps cover a part of the image at another
        # resolution, so controllers see only full-frame calls and the crop runs plain attention
        return plain()
    hw = call_hw(call, q.shape[1])
    controllers = [c for c in call.controllers if c.wants(site, hw, call)]
    if not controllers:
        return plain()
    cou = call_conds(extra_options)
    if all(c.reads_qk for c in controllers):
        for cond_index, qc, kc in zip(cou, q.chunk(len(cou)), k.chunk(len(cou))):
            for c in controllers:
                c.process_qk(qc, kc, heads, site, cond_index, call)
        return plain()
    if all(c.head_mean_only for c in controllers):
        hand_means(head_mean(q, k, heads), cou, controllers, site, call)
        return plain()
    probs, changed = hand_maps(attention_probs(q, k, heads), cou, controllers, site, call)
    if changed:
        if inner is not None and (id(call), site) not in _WARNED:
            _WARNED.add((id(call), site))
            logging.warning("Z2I: the cross-attention maps at %s are rewritten (CSG mixup), so another pack's "
                            "attn2 replace patch on that layer is not applied in this call", site)
    elif inner is not None:
        return inner(q, k, v, extra_options)
    return apply_probs(probs, v, heads)


_WARNED: set = set()
