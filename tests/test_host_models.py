"""The tiny checkpoints load through ComfyUI's own CheckpointLoaderSimple as the right model families."""
import pytest

pytestmark = pytest.mark.host


@pytest.mark.parametrize("kind, family, base, model_type", [
    ("sd15", "SD15", "BaseModel", "EPS"),
    ("sd2v", "SD20", "BaseModel", "V_PREDICTION"),
    ("sdxl", "Segmind_Vega", "SDXL", "EPS"),
])
def test_checkpoint_family_detected(host, checkpoints, kind, family, base, model_type):
    import comfy.supported_models as sm

    res = host.run_prompt({"ckpt": {"class_type": "CheckpointLoaderSimple",
                                    "inputs": {"ckpt_name": checkpoints[kind]}}}, targets=["ckpt"])
    model, clip, vae = (res.output("ckpt", i) for i in range(3))
    config = model.model.model_config
    assert type(config).__name__ == family
    assert type(model.model).__name__ == base
    assert model.model.model_type.name == model_type
    if kind == "sdxl":
        assert isinstance(config, sm.SDXL)
    else:
        assert not isinstance(config, sm.SDXL)
    # the topology the pack relies on: cross-attention in down, middle and up blocks; a middle block (h-space)
    names = [n for n, _ in model.model.diffusion_model.named_modules() if n.endswith("attn2")]
    assert any(n.startswith("input_blocks") for n in names)
    assert any(n.startswith("middle_block") for n in names)
    assert any(n.startswith("output_blocks") for n in names)
    assert clip is not None and vae is not None


def test_unknown_checkpoint_is_a_validation_error(host):
    from z2i.headless.host import PromptFailed
    with pytest.raises(PromptFailed, match="ckpt_name"):
        host.run_prompt({"ckpt": {"class_type": "CheckpointLoaderSimple",
                                  "inputs": {"ckpt_name": "does-not-exist.safetensors"}}}, targets=["ckpt"])
