"""Checks shared by the loaders of direction files (edit directions, h-space directions)."""
from __future__ import annotations

import torch


def check_file_tensors(tensors: dict) -> None:
    """Floating-point and finite values only (a NaN in a direction turns every edited image NaN/black)."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"its {key} tensor holds {t.dtype} values, expected floating point")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"its {key} tensor holds {bad} NaN or infinite value(s)")
