"""Input normalization and training augmentation, applied to whole batches on the training device.

The study's per-image pipeline was ToTensor -> Normalize((0.5,), (0.5,)) -> RandomRotation(10). Here the
same maths runs batched (one random angle per image), which is what makes CPU training fast enough:
`to_model_tensor` is ToTensor + Normalize, `augment_batch` is the random affine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kmnist_core.preprocess import MEAN, STD


@dataclass(frozen=True)
class Augmentation:
    degrees: float = 10.0  # rotation drawn uniformly from [-degrees, degrees]
    translate: float = 0.0  # shift, as a fraction of the image side
    scale: float = 0.0  # zoom drawn from [1 - scale, 1 + scale]
    # Value for pixels rotated in from outside. The study rotated *after* Normalize, so torchvision
    # filled with 0.0, i.e. mid-grey; -1.0 is the true background.
    fill: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


AUGMENTATIONS = {
    "none": None,
    "study": Augmentation(degrees=10.0, fill=0.0),
    "strong": Augmentation(degrees=12.0, translate=0.1, scale=0.1, fill=-1.0),
}


def to_model_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) light-on-dark -> float (N, 1, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    return ((x.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def augment_batch(x: torch.Tensor, aug: Augmentation, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random rotation / shift / scale, drawn independently for each image of the batch."""
    n = x.shape[0]
    opts = {"generator": generator, "device": "cpu"}
    angle = (torch.rand(n, **opts) * 2 - 1) * math.radians(aug.degrees)
    zoom = 1 + (torch.rand(n, **opts) * 2 - 1) * aug.scale
    shift = (torch.rand(n, 2, **opts) * 2 - 1) * aug.translate * 2  # grid units span 2 per side
    return affine(x, angle, zoom, shift, aug.fill)


def affine(x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor, fill: float) -> torch.Tensor:
    """Each image rotated by `angle` (radians), zoomed by `zoom` and shifted by `shift` (N, 2; grid units,
    2 per side); pixels brought in from outside take the value `fill`."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    # grid_sample pads with zeros; shift by `fill` so the padding takes the requested value.
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
