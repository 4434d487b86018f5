"""The multivariate mixture model and its parts."""

from mvmm.mixture.model import ConvergenceWarning, MultivariateMixture, SubtypeCollapseWarning
from mvmm.mixture.params import MixtureParams
from mvmm.mixture.subtypes import parse_subtypes

__all__ = ["MultivariateMixture", "MixtureParams", "ConvergenceWarning", "SubtypeCollapseWarning", "parse_subtypes"]
