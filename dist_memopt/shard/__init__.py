"""Shard descriptions, their geometry in the 2-D views, and the statistic reduction."""

from dist_memopt.shard.geometry import RangeGeometry, balanced_split, square_matricize
from dist_memopt.shard.reduce import StatReducer
from dist_memopt.shard.spec import ParamLayout, Segment, ShardSpec, layout_of, local_tensor, set_layout

__all__ = [
    "RangeGeometry",
    "balanced_split",
    "square_matricize",
    "StatReducer",
    "ParamLayout",
    "Segment",
    "ShardSpec",
    "layout_of",
    "local_tensor",
    "set_layout",
]
