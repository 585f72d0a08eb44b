"""Universal checkpoints: resume SMMF / Alada on another data-parallel size (or ZeRO stage).

A ZeRO checkpoint holds each rank's flat partitions, so it only loads on the same partitioning.
DeepSpeed's answer is its *universal* checkpoint (one folder per parameter); its converter,
``ds_to_universal``, only knows Adam's ``exp_avg``/``exp_avg_sq``. This module is the converter
for dist_memopt's state, which is laid out per parameter and therefore converts exactly:

* per-element state (SMMF's sign bits, Alada's ``exp_avg``, dense moments) is gathered from the
  ranks' ranges into one tensor per parameter;
* factors (row/column statistics, ``v0``) are the whole parameter's on every rank holding a piece,
  and are written once.

Usage (then set ``"checkpoint": {"load_universal": true}`` in ds_config and load as usual)::

    python -m dist_memopt.integrations.deepspeed.universal \\
        --input_folder CKPT/TAG --output_folder CKPT/TAG_universal

The output follows DeepSpeed's universal layout (``zero/<param>/fp32.pt``, ``step.pt``,
``zero/optimizer_state.pt``, the model-states files), so DeepSpeed restores weights and global
state itself; our state goes to ``dist_memopt/<param>/<key>.pt``, which the engine's loader (set up
per instance by :func:`enable_universal`) slices into each rank's new layout.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import types
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from dist_memopt.integrations.deepspeed.layouts import PartitionLayout
from dist_memopt.integrations.deepspeed.registry import OPTIMIZERS
from dist_memopt.optim.base import FactoredOptimizer
from dist_memopt.optim.state_layout import PER_ELEMENT_KINDS as PER_ELEMENT
from dist_memopt.optim.bits import pack_signs, unpack_signs
from dist_memopt.shard.spec import ParamLayout, Segment, ShardSpec, layout_of

__all__ = ["convert", "enable_universal", "main", "METADATA_KEY", "STATE_FOLDER"]

#: key our optimizer's state_dict gains under DeepSpeed: optimizer class and each tensor's segments
METADATA_KEY = "dist_memopt"
#: folder of a universal checkpoint that holds our per-parameter state
STATE_FOLDER = "dist_memopt"
HOW_TO_CONVERT = (
    "Convert the checkpoint with `python -m dist_memopt.integrations.deepspeed.universal --input_folder "
    "CKPT/TAG --output_folder CKPT/TAG_universal` (DeepSpeed's ds_to_universal knows only Adam's state) "
    'and load that with "checkpoint": {"load_universal": true} in ds_config.'
)


# --- save side: record the layout next to the state --------------------------------------------


def _segments_of(optimizer: FactoredOptimizer) -> list[list[tuple]]:
    """Per tensor, in state-dict order: ``(name, shape, start, end, offset)`` of each segment."""
    return [
        [(s.name, tuple(s.spec.global_shape), s.spec.start, s.spec.end, s.offset) for s in layout_of(p).segments]
        for group in optimizer.param_groups
        for p in group["params"]
    ]


def _add_metadata(optimizer: FactoredOptimizer, state_dict: dict) -> dict:
    state_dict[METADATA_KEY] = {"optimizer": type(optimizer).__name__, "segments": _segments_of(optimizer)}
    return state_dict


def _check_metadata(optimizer: FactoredOptimizer, state_dict: dict) -> dict:
    saved = state_dict.pop(METADATA_KEY, None)
    if saved is not None and saved["segments"] != _segments_of(optimizer):
        raise ValueError(
            f"this {type(optimizer).__name__} state was saved with another partitioning of the parameters "
            f"(data-parallel size, ZeRO stage, sub_group_size or parameter groups differ). {HOW_TO_CONVERT}"
        )
    return state_dict


# --- offline conversion -------------------------------------------------------------------------

_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_SHARDED_KEYS = ("base_optimizer_state", "optimizer_state_dict", "single_partition_of_fp32_groups", "fp32_flat_groups", "param_slice_mappings")


def convert(input_folder: str, output_folder: str) -> None:
    """Write a universal checkpoint of ``input_folder`` (one tag of a ZeRO 1/2/3 checkpoint)."""
    ranks = _rank_files(input_folder)
    merged: dict[str, dict[str, Any]] = {}
    optimizer_name: Optional[str] = None
    for path in ranks:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = checkpoint.get("base_optimizer_state", checkpoint.get("optimizer_state_dict"))
        flats = checkpoint.get("single_partition_of_fp32_groups", checkpoint.get("fp32_flat_groups"))
        if not isinstance(base, dict) or METADATA_KEY not in base:
            raise ValueError(
                f"{path} holds no dist_memopt optimizer state (saved by another optimizer, or an elastic "
                "checkpoint); for Adam use DeepSpeed's ds_to_universal"
            )
        optimizer_name = base[METADATA_KEY]["optimizer"]
        optimizer = _scratch_optimizer(optimizer_name)
        index = 0
        for group in base["param_groups"]:
            for param_id in group["params"]:
                segments = [Segment(o, ShardSpec(shape, s, e), name) for name, shape, s, e, o in base[METADATA_KEY]["segments"][index]]
                _merge_tensor(merged, optimizer, group, segments, base["state"].get(param_id, {}), flats[index], path)
                index += 1
    _write(output_folder, merged, ranks[0], input_folder, optimizer_name)


def _rank_files(folder: str) -> list[str]:
    found = {}
    for path in glob.glob(os.path.join(folder, "*_optim_states.pt")):
        match = _OPTIM_FILE.search(os.path.basename(path))
        if match is None:
            continue
        if int(match.group(2)) != 0:
            raise NotImplementedError("universal conversion of tensor/pipeline-parallel checkpoints is not supported")
        found[int(match.group(1))] = path
    if not found:
        raise FileNotFoundError(f"no ZeRO optimizer files (*_optim_states.pt) in {folder}")
    if sorted(found) != list(range(len(found))):
        raise FileNotFoundError(f"ZeRO optimizer files of data-parallel ranks {sorted(found)} in {folder}: some are missing")
    return [found[r] for r in range(len(found))]


def _scratch_optimizer(name: str) -> FactoredOptimizer:
    """An instance of the saved optimizer's class, only to read its state layout."""
    if name not in OPTIMIZERS:
        raise ValueError(f"checkpoint saved by unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(1))])


def _merge_tensor(merged: dict, optimizer: FactoredOptimizer, group: dict, segments: list[Segment], state: dict, flat: Tensor, where: str) -> None:
    """Add one saved tensor's pieces (weights, state) to the per-parameter ``merged`` table."""
    kinds = optimizer.state_kinds
    pieces = optimizer.segment_states(group, ParamLayout(tuple(segments)), state) if state else [(s, {}) for s in segments]
    for segment, views in pieces:
        spec = segment.spec
        if not segment.name:
            raise ValueError(f"{where}: a parameter without a name cannot go into a universal checkpoint")
        entry = merged.setdefault(segment.name, {"shape": spec.global_shape, "covered": torch.zeros(spec.global_numel, dtype=torch.int8), "state": {}})
        if spec.numel:
            entry.setdefault("fp32", torch.zeros(spec.global_numel))[spec.start : spec.end] = flat[segment.offset : segment.offset + spec.numel].float()
            entry["covered"][spec.start : spec.end] += 1
        if "step" in state:
            entry.setdefault("steps", set()).add(float(state["step"]))
        for key, view in views.items():
            kind = kinds[key]
            if kind in PER_ELEMENT:
                value = unpack_signs(view, spec.numel) > 0 if kind == "bits" else view
                full = entry["state"].setdefault(key, torch.zeros(spec.global_numel, dtype=value.dtype))
                full[spec.start : spec.end] = value
            elif key not in entry["state"]:
                entry["state"][key] = view.clone()  # factors: whole on every rank holding a piece
            elif not torch.allclose(entry["state"][key], view, rtol=1e-6, atol=0):
                raise ValueError(f"{where}: factor '{key}' of {segment.name} differs between ranks; the checkpoint is inconsistent")


def _write(output: str, merged: dict, rank0_file: str, input_folder: str, optimizer_name: str) -> None:
    for name, entry in merged.items():
        if not torch.equal(entry["covered"], torch.ones_like(entry["covered"])):
            raise ValueError(f"the ranks' pieces of {name} do not cover it exactly once; the checkpoint is incomplete")
        if len(entry.get("steps", ())) > 1:
            raise ValueError(f"the ranks disagree on the step count of {name}: {sorted(entry['steps'])}")
        folder = os.path.join(output, "zero", name)
        os.makedirs(folder, exist_ok=True)
        torch.save({"param": entry["fp32"].view(entry["shape"])}, os.path.join(folder, "fp32.pt"))
        if entry.get("steps"):
            torch.save(torch.tensor(entry["steps"].pop(), dtype=torch.float32), os.path.join(folder, "step.pt"))
        state_folder = os.path.join(output, STATE_FOLDER, name)
        os.makedirs(state_folder, exist_ok=True)
        for key, value in entry["state"].items():
            torch.save({"param": value}, os.path.join(state_folder, f"{key}.pt"))
    checkpoint = torch.load(rank0_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    base = checkpoint.get("base_optimizer_state", checkpoint.get("optimizer_state_dict"))
    common = {k: v for k, v in checkpoint.items() if k not in _SHARDED_KEYS}
    common["param_groups"] = base["param_groups"]
    common.setdefault("ds_version", _deepspeed_version())  # ZeRO 1/2 loaders insist on it; ZeRO-3 saves none
    common[METADATA_KEY] = {"optimizer": optimizer_name}
    torch.save(common, os.path.join(output, "zero", "optimizer_state.pt"))
    _copy_model_states(input_folder, output)
    parent, tag = os.path.split(os.path.normpath(output))
    with open(os.path.join(parent, "latest_universal"), "w") as handle:
        handle.write(tag)


def _deepspeed_version() -> str:
    from deepspeed.git_version_info import version

    return version


def _copy_model_states(input_folder: str, output: str) -> None:
    """Copy the model-states files, under both ZeRO 1/2 and ZeRO 3 names, so that the universal
    checkpoint also loads at the other stage (DeepSpeed reads only its metadata, not the weights)."""
    stage3_name, stage12_name = "zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"
    for path in glob.glob(os.path.join(input_folder, "*model_states.pt")):
        shutil.copy2(path, output)
    for source, alias in ((stage3_name, stage12_name), (stage12_name, stage3_name)):
        if os.path.isfile(os.path.join(output, source)) and not os.path.isfile(os.path.join(output, alias)):
            shutil.copy2(os.path.join(output, source), os.path.join(output, alias))


# --- load side: slice each parameter's state into this rank's new layout -----------------------


def enable_universal(engine: Any, optimizer: FactoredOptimizer, layouts: list[PartitionLayout]) -> None:
    """Per instance: record layouts in saved state, load universal checkpoints, explain DP changes."""
    optimizer.register_state_dict_post_hook(_add_metadata)
    optimizer.register_load_state_dict_pre_hook(_check_metadata)
    wrapper = engine.optimizer
    original = wrapper._load_universal_checkpoint
    zero3 = hasattr(wrapper, "fp32_partitioned_groups_flat")

    def load_universal(self: Any, folder: str, load_optimizer_states: bool, load_from_fp32_weights: bool) -> None:
        if not load_optimizer_states:
            return original(folder, load_optimizer_states, load_from_fp32_weights)
        saved = torch.load(os.path.join(folder, "zero", "optimizer_state.pt"), weights_only=False)
        name = saved.get(METADATA_KEY, {}).get("optimizer")
        if name != type(optimizer).__name__:
            raise ValueError(
                f"universal checkpoint {folder} holds {name or 'no dist_memopt'} state, this engine runs "
                f"{type(optimizer).__name__}; convert checkpoints with dist_memopt.integrations.deepspeed.universal"
            )
        if zero3:  # DeepSpeed's ZeRO-3 loader insists on Adam's keys: restore weights, then ours
            self._load_global_state_stage3(saved)
            self.load_module_checkpoint_state_from_checkpoint_dir_stage3(folder, load_from_fp32_weights=True)
            for group, loaded in zip(optimizer.param_groups, saved["param_groups"]):
                group.update({k: v for k, v in loaded.items() if k != "params"})
        else:
            original(folder, load_optimizer_states, load_from_fp32_weights)
        _load_state(optimizer, layouts, folder)
        relink = getattr(self, "_lazy_init_hp_params_optimizer_state", None)
        if relink is not None:
            relink()

    wrapper._load_universal_checkpoint = types.MethodType(load_universal, wrapper)
    _explain_dp_changes(engine)


def _load_state(optimizer: FactoredOptimizer, layouts: list[PartitionLayout], folder: str) -> None:
    optimizer.synchronize()
    kinds = optimizer.state_kinds
    for layout in layouts:
        group = optimizer.param_groups[layout.group_index]
        tensor_layout = layout_of(layout.tensor)
        state = optimizer.new_state(group, tensor_layout, layout.tensor.device)
        for segment, views in optimizer.segment_states(group, tensor_layout, state):
            spec = segment.spec
            step_file = os.path.join(folder, "zero", segment.name, "step.pt")
            if os.path.isfile(step_file):
                state["step"] = torch.load(step_file, weights_only=False).to(torch.float32).reshape(())
            for key, view in views.items():
                path = os.path.join(folder, STATE_FOLDER, segment.name, f"{key}.pt")
                if not os.path.isfile(path):
                    raise ValueError(
                        f"universal checkpoint {folder} lacks state '{key}' of {segment.name}: it was saved with "
                        "other optimizer settings (beta=None, vector_reshape, momentum_in_grad)"
                    )
                full = torch.load(path, weights_only=False)["param"].reshape(-1)
                if kinds[key] == "bits":
                    pack_signs(full[spec.start : spec.end], view)
                elif kinds[key] in PER_ELEMENT:
                    view.copy_(full[spec.start : spec.end])
                elif full.numel() != view.numel():
                    raise ValueError(f"state '{key}' of {segment.name} has {full.numel()} values, {view.numel()} expected")
                else:
                    view.copy_(full)
        optimizer.state[layout.tensor] = state


def _explain_dp_changes(engine: Any) -> None:
    """DeepSpeed refuses a plain ZeRO checkpoint of another DP size; say how to convert ours."""
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    original = engine._load_zero_checkpoint

    def load_zero_checkpoint(load_dir: str, tag: str, load_optimizer_states: bool = True) -> bool:
        try:
            return original(load_dir, tag, load_optimizer_states=load_optimizer_states)
        except ZeRORuntimeException as error:
            if "world size" not in str(error):
                raise
            raise ZeRORuntimeException(f"{error} {HOW_TO_CONVERT}") from error

    engine._load_zero_checkpoint = load_zero_checkpoint


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_folder", required=True, help="one tag of a DeepSpeed ZeRO checkpoint")
    parser.add_argument("--output_folder", required=True, help="where to write the universal checkpoint")
    args = parser.parse_args(argv)
    convert(args.input_folder, args.output_folder)
    print(f"wrote universal checkpoint {args.output_folder}")


if __name__ == "__main__":
    main()
