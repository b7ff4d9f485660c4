"""Every Z2I sampler ends a schedule the same way: given the sigmas of the inversion's "diffusers (exact)" variant
(ending at the model's lowest level sigma(0), not 0), each returns the latent there in diffusers' units,
x / sqrt(1 + sigma(0)^2) (guidance.ddim.finish). At zero strength each method is exactly the Z2I DDIM sampler,
so a sampler that skipped the final scaling would differ from it by 4e-4 relative."""
import pytest
import torch

from z2i.tests import test_agg_nodes, test_asyrp_nodes, test_csg_nodes, test_pix2pix_zero

pytestmark = pytest.mark.host
DDIM = {"class_type": "Z2I_DDIMSampler", "inputs": {"eta": 0.0}}


def _diffusers_variant(p: dict) -> dict:
    p["inv"]["inputs"]["variant"] = "diffusers (exact)"
    return p


CASES = {
    "pix2pix-zero": lambda ck, sampler=None: test_pix2pix_zero.graph(ck, 0.0, sampler=sampler),
    "AGG": lambda ck, sampler=None: test_agg_nodes.graph(ck, weight=0.0, sampler=sampler),
    "Asyrp": lambda ck, sampler=None: test_asyrp_nodes.graph(ck, scale=0.0, sampler=sampler),
    "CSG": lambda ck, sampler=None: test_csg_nodes.graph(ck, lambda_pre=0.0, mixup=False, sampler=sampler),
}


@pytest.mark.parametrize("method", list(CASES))
def test_zero_strength_equals_ddim_on_the_diffusers_schedule(host, checkpoints, method):
    build = CASES[method]
    res = host.run_prompt(_diffusers_variant(build(checkpoints["sd15"])), targets=["s", "inv", "ckpt"])
    ours = res.output("s", 0)["samples"]
    ddim = host.run_prompt(_diffusers_variant(build(checkpoints["sd15"], sampler=DDIM)), targets=["s"]).output("s", 0)
    sigma_min = float(res.output("ckpt", 0).get_model_object("model_sampling").sigma_min)
    assert float(res.output("inv", 2)[-1]) == pytest.approx(sigma_min, rel=1e-6)
    assert torch.equal(ours, ddim["samples"]), method
