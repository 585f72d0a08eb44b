"""The optimizers: SMMF and Alada on one shared, sharding-aware base."""

from dist_memopt.optim.alada import Alada
from dist_memopt.optim.base import FactoredOptimizer, NonFiniteGradientError
from dist_memopt.optim.smmf import SMMF

__all__ = ["SMMF", "Alada", "FactoredOptimizer", "NonFiniteGradientError"]
