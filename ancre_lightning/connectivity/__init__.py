"""The connectivity backbone shared by every domain.

``build_connectivity(name, num_layers, **options)`` makes a connectivity, ``ConnectedStack``
runs blocks with it, ``weighted_sum`` is the aggregation that every merge goes through.
"""

from .acn import AutoCompressing
from .aggregation import AGGREGATION_IMPLS, weighted_sum, weighted_sum_loop
from .ancre import ANCRe
from .base import Connectivity
from .denseformer import DenseFormer
from .fixed import FixedTopology
from .registry import CONNECTIVITIES, build_connectivity, connectivity_options
from .residual import Residual
from .stack import ConnectedStack

__all__ = [
    "AGGREGATION_IMPLS",
    "ANCRe",
    "AutoCompressing",
    "CONNECTIVITIES",
    "ConnectedStack",
    "Connectivity",
    "DenseFormer",
    "FixedTopology",
    "Residual",
    "build_connectivity",
    "connectivity_options",
    "weighted_sum",
    "weighted_sum_loop",
]
