"""Pure-torch core of Z2I: schedule algebra, the DDIM step and samplers, guidance losses.

Nothing in this package imports ComfyUI (a test enforces it). Samplers follow the k-diffusion ABI that
ComfyUI's KSAMPLER calls: `sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`
with `model(x, sigma, **extra_args) -> denoised`. Work is done in k-diffusion sigma space
(x = x0 + sigma * eps); the papers' alpha-bar form appears only through `schedules.py`.
"""
