"""Every Z2I socket type, declared once, and the frozen objects that travel through them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comfy_api.latest import io

from ..guidance.inversion import Trajectory

InversionType = io.Custom("Z2I_INVERSION")
CSGSourceMapsType = io.Custom("Z2I_CSG_SOURCE_MAPS")


@dataclass(frozen=True)
class ModelSignature:
    """Enough identity of a MODEL to refuse using an inversion with a different one."""

    family: str          # supported_models class, e.g. SD15, SD20, SDXL
    model_type: str      # EPS or V_PREDICTION
    latent_format: str
    unet_id: int         # the loaded diffusion model (shared by clones of one checkpoint)
    patches: str         # ModelPatcher.patches_uuid: changes with LoRA and other weight patches

    def mismatch(self, other: "ModelSignature") -> str | None:
        """Why `other` cannot use what was made with self (None when it can)."""
        if (self.family, self.model_type, self.latent_format) != (other.family, other.model_type,
                                                                   other.latent_format):
            return (f"it was made with a {self.family} {self.model_type} model and this is a "
                    f"{other.family} {other.model_type} model")
        if self.unet_id != other.unet_id:
            return "it was made with a different checkpoint of the same family"
        return None


@dataclass(frozen=True)
class Inversion:
    """The output of Z2I DDIM Inversion. Tensors are never modified after creation (cached outputs are
    shared by every later run of the graph): consumers copy before writing."""

    trajectory: Trajectory           # model space, ascending sigmas
    model: ModelSignature
    positive: Any                    # the CONDITIONING used (ComfyUI list of [tensor, dict])
    negative: Any
    cfg: float
    variant: str
    latent_shape: tuple
    schedule: Any = None             # the reverse pass's sigmas when they are not the trajectory's levels ("csg")

    @property
    def sigmas(self):
        """The schedule for the reverse pass: descending, ending at the clean latent's level."""
        return self.schedule if self.schedule is not None else self.trajectory.sigmas.flip(0)

    @property
    def paired(self) -> bool:
        """Whether the trajectory's levels are the reverse schedule's (every variant but the CSG code's, whose
        latents sit one training step below the levels the sampler gives them)."""
        return self.schedule is None
