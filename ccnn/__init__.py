"""ccnn: training neural networks under constraints on their outputs.

The P-step of CCNN (Pathak, Krähenbühl, Darrell 2015) — the latent distribution closest in KL to
a segmentation network's output under linear constraints built from image-level tags:

>>> import torch
>>> from ccnn import solve_latent, tag_bounds
>>> logits = torch.randn(2, 21, 41, 41)
>>> bounds = tag_bounds([[0, 15], [0, 7, 12]], num_classes=21)
>>> result = solve_latent(logits, *bounds)
>>> result.P.shape, bool(result.converged.all())
(torch.Size([2, 21, 41, 41]), True)
"""

from ccnn.constraints import Bounds, RegionConstraints, box_weights, tag_bounds
from ccnn.latent import LatentResult, latent_objective, solve_latent
from ccnn.loss import ConstrainedLoss

__version__ = "0.1.0"

__all__ = [
    "Bounds",
    "ConstrainedLoss",
    "LatentResult",
    "RegionConstraints",
    "__version__",
    "box_weights",
    "latent_objective",
    "solve_latent",
    "tag_bounds",
]
