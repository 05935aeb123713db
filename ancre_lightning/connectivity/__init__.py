"""The connectivity backbone shared by every domain.

``build_connectivity(name, num_layers, **options)`` makes a connectivity, ``ConnectedStack``
runs blocks with it, ``weighted_sum`` is the aggregation that every merge goes through.
"""

from .acn import AutoCompressing
from .aggregation import AGGREGATION_IMPLS, weighted_sum, weighted_sum_loop
from .ancre import ANCRe
from .attnres import AttentionResiduals
from .base import Connectivity, PerTokenWiring, StaticWiring
from .denseformer import DenseFormer
from .fixed import FixedTopology
from .hyper import HyperConnections
from .mhc import ManifoldHyperConnections, sinkhorn
from .mudd import DynamicDense
from .registry import CONNECTIVITIES, build_connectivity, connectivity_options
from .residual import Residual
from .stack import ConnectedStack

__all__ = [
    "AGGREGATION_IMPLS",
    "ANCRe",
    "AttentionResiduals",
    "AutoCompressing",
    "CONNECTIVITIES",
    "ConnectedStack",
    "Connectivity",
    "DenseFormer",
    "DynamicDense",
    "FixedTopology",
    "HyperConnections",
    "ManifoldHyperConnections",
    "PerTokenWiring",
    "Residual",
    "StaticWiring",
    "build_connectivity",
    "connectivity_options",
    "sinkhorn",
    "weighted_sum",
    "weighted_sum_loop",
]
