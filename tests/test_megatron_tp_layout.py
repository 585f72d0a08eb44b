"""The small pieces of the Megatron tensor-parallel layout, on one process (no Megatron needed)."""

import itertools
import math

import pytest
import torch

from dist_memopt.integrations.megatron.sharded_state import range_boxes
from dist_memopt.integrations.megatron.tensor_parallel import Box, TPPiece, attribute_boxes, piece_spec


def _elements(global_shape, boxes):
    """Global flat positions of boxes, box after box, each in row-major order."""
    full = torch.arange(math.prod(global_shape)).view(global_shape)
    return torch.cat([full[tuple(slice(o, o + s) for o, s in zip(b.offset, b.shape))].reshape(-1) for b in boxes])


@pytest.mark.parametrize("shape, box", [((7, 5), Box((2, 1), (3, 4))), ((4, 3, 5), Box((1, 0, 2), (2, 3, 3))), ((9,), Box((2,), (5,)))])
def test_range_boxes_tile_every_window_of_a_box(shape, box):
    inside = _elements(shape, [box])
    for lo, hi in itertools.combinations(range(box.numel + 1), 2):
        boxes = range_boxes(box, lo, hi)
        assert torch.equal(_elements(shape, boxes), inside[lo:hi]), (lo, hi, boxes)
        assert len(boxes) <= 2 * len(shape) - 1
    assert range_boxes(box, 3, 3) == []


class _Param:
    """A stand-in with Megatron's tensor-parallel attributes (only the attributes are read)."""

    def __init__(self, dim: int, stride: int) -> None:
        self.tensor_model_parallel, self.partition_dim, self.partition_stride = True, dim, stride


def test_attribute_boxes_follow_megatrons_initialization_rule():
    # a gated fc1 (gate; up) of 2 x 22 rows over 2 ranks: rank 1 holds gate rows 11..21, up rows 33..43
    boxes = attribute_boxes(_Param(0, 2), torch.Size((44, 18)), 1, 2)
    assert boxes == (Box((11, 0), (11, 18)), Box((33, 0), (11, 18)))
    piece = TPPiece(torch.Size((44, 18)), boxes)
    assert piece.is_split and torch.equal(_elements((44, 18), boxes), torch.cat([torch.arange(198, 396), torch.arange(594, 792)]))
    # a row-parallel weight: a column block, one run per row
    row = TPPiece(torch.Size((18, 22)), attribute_boxes(_Param(1, 1), torch.Size((18, 22)), 0, 2))
    assert len(row.runs()) == 18 and row.runs()[1].start == 22
    spec = piece_spec(torch.Size((18, 11)), row, (5, 30), None, None)  # a distributed optimizer's range of it
    assert torch.equal(spec.take(torch.arange(18 * 22)), _elements((18, 22), row.boxes)[5:30])
    whole = piece_spec(torch.Size((18,)), None, None, None, None)
    assert (whole.start, whole.end, whole.group) == (0, 18, None)


def test_pieces_come_from_megatrons_sharded_tensors_and_bad_ones_name_the_parameter():
    """A gated fc1's two ShardedTensors (Megatron's own class, as its checkpointing builds them)."""
    pytest.importorskip("megatron.core")
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from dist_memopt.integrations.megatron.tensor_parallel import piece_from_sharded_tensors

    param = torch.zeros(22, 18)  # TP rank 1 of 2: [gate rows 11..21; up rows 33..43] of (44, 18)
    gate, up = torch.chunk(param, 2)
    built = [ShardedTensor.from_rank_offsets("fc1", gate, (0, 1, 4)), ShardedTensor.from_rank_offsets("fc1", up, (0, 3, 4))]
    piece = piece_from_sharded_tensors(param, built, "decoder.layers.0.mlp.linear_fc1.weight")
    assert piece.global_shape == (44, 18) and piece.boxes == (Box((11, 0), (11, 18)), Box((33, 0), (11, 18)))
    with pytest.raises(ValueError, match=r"parameter 'fc1.weight': its checkpoint pieces hold 198 of its 396 elements"):
        piece_from_sharded_tensors(param, built[:1], "fc1.weight")
