"""Pure-torch attention patches with ComfyUI's patch signatures (q, k, v, extra_options).

Nothing in this package imports ComfyUI (a test enforces it). The cross-attention controllers (capture,
pix2pix-zero guidance, CSG mixup) live here.
"""
