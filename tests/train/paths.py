"""Where the repository and its configs are (importable from spawned test processes too)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIGS = REPO / "configs" / "tiny"
MEGATRON_CONFIGS = REPO / "configs" / "megatron"
