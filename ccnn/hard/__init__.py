"""Hard constraints on network outputs: linear-algebra building blocks.

The hard-constraint methods (Márquez-Neila, Salzmann, Fua 2017) solve symmetric, often singular
KKT systems matrix-free at every step; :func:`minres_qlp` is the solver they use.
"""

from ccnn.hard.minres_qlp import Flag, MinresQLPInfo, minres_qlp

__all__ = ["Flag", "MinresQLPInfo", "minres_qlp"]
