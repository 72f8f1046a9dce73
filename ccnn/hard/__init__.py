"""Hard constraints on network outputs, importable on its own (it needs only PyTorch).

Márquez-Neila, Salzmann and Fua, "Imposing Hard Constraints on Deep Networks: Promises and
Limitations" (2017): at every step the constraints on the network's outputs are linearized and the
KKT system of Eq. 5, 6 or 12 is solved matrix-free with MINRES-QLP (Choi, Paige and Saunders
2011). Beside it: the active-constraint pools of §4.4 (random, mined by Eq. 9, and a persistent
pool that does not forget), the soft and Lagrangian baselines, and a toolbox of exact projections
and reparameterizations.

>>> import torch
>>> from ccnn.hard import HardSGD
>>> model = torch.nn.Linear(3, 2)
>>> opt = HardSGD(model, lr=0.1)
>>> x = torch.randn(8, 3)
>>> step = opt.step(lambda net: net(x).square().mean(),
...                 lambda net: net(x).sum(1) - 1.0)   # outputs of each sample sum to 1
>>> bool((model(x).sum(1) - 1.0).abs().max() < 1e-4)
True
"""

from ccnn.hard.active import (
    ActiveSet,
    MinedActive,
    PersistentActive,
    RandomActive,
    median_violation,
)
from ccnn.hard.kkt import KKTStep, kkt_step
from ccnn.hard.minres_qlp import Flag, MinresQLPInfo, minres_qlp
from ccnn.hard.optim import HardAdam, HardGaussNewton, HardSGD, TargetCorrection
from ccnn.hard.penalties import DualAscent, IndexedMultipliers, lagrangian, soft_penalty
from ccnn.hard.posthoc import Projection, ProjectionReport, constraint_error, nonlinear_projection
from ccnn.hard.projections import (
    Projected,
    dykstra,
    project_affine,
    project_box,
    project_l1_ball,
    project_l2_ball,
    project_nonnegative,
    project_simplex,
)
from ccnn.hard.reparam import Box, Positive, Simplex
from ccnn.hard.tanabe import Tanabe, TanabeStep, huber, input_derivatives, tanabe_multipliers

__all__ = [
    "ActiveSet",
    "Box",
    "DualAscent",
    "Flag",
    "HardAdam",
    "HardGaussNewton",
    "HardSGD",
    "IndexedMultipliers",
    "KKTStep",
    "MinedActive",
    "MinresQLPInfo",
    "PersistentActive",
    "Positive",
    "Projected",
    "Projection",
    "ProjectionReport",
    "RandomActive",
    "Simplex",
    "Tanabe",
    "TanabeStep",
    "TargetCorrection",
    "constraint_error",
    "dykstra",
    "huber",
    "input_derivatives",
    "kkt_step",
    "lagrangian",
    "median_violation",
    "minres_qlp",
    "nonlinear_projection",
    "project_affine",
    "project_box",
    "project_l1_ball",
    "project_l2_ball",
    "project_nonnegative",
    "project_simplex",
    "soft_penalty",
    "tanabe_multipliers",
]
