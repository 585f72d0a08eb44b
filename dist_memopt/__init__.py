"""dist_memopt: SMMF and Alada, exact on the parameter shards of FSDP, DeepSpeed and Megatron."""

from dist_memopt.optim import SMMF, Alada, NonFiniteGradientError
from dist_memopt import integrations  # noqa: F401  (after optim: registers layouts and checkpoint styles)
from dist_memopt.groups import decay_param_groups
from dist_memopt.memory import state_bytes
from dist_memopt.shard import Segment, ShardSpec, set_layout

__version__ = "0.2.0"

__all__ = ["SMMF", "Alada", "decay_param_groups", "NonFiniteGradientError", "state_bytes", "ShardSpec", "Segment", "set_layout", "__version__"]
