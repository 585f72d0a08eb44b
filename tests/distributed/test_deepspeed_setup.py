"""The DeepSpeed integration's set-up, in one process: version pin, hooks, names, launcher entry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

import dist_memopt.integrations.deepspeed as dsi  # noqa: E402
from dist_memopt.integrations.deepspeed.run import split_arguments  # noqa: E402


@pytest.mark.parametrize("version", ["0.18.0", "0.19.7", "0.19.9", "0.20.0", "0.19.8rc1", "0.19.8.dev0", "nonsense"])
def test_other_deepspeed_versions_are_refused(version):
    with pytest.raises(dsi.UnsupportedDeepSpeedVersion, match=rf"supports DeepSpeed 0\.19\.8, found {version}.*pip install deepspeed==0\.19\.8"):
        dsi.check_deepspeed_version(version)


def test_supported_versions_pass():
    import deepspeed

    assert dsi.check_deepspeed_version() == deepspeed.__version__
    assert dsi.check_deepspeed_version("0.19.8+cu124") == "0.19.8+cu124"


def test_install_is_idempotent_and_contained():
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    dsi.install()
    dsi.install()
    assert dsi.installed()
    for name in ("_is_supported_optimizer", "_configure_basic_optimizer", "_configure_optimizer"):
        method = getattr(DeepSpeedEngine, name)
        assert not hasattr(method.__wrapped__, "_dist_memopt_hook"), f"{name} wrapped twice"
        assert method.__wrapped__.__module__ == "deepspeed.runtime.engine"
    assert ZERO_SUPPORTED_OPTIMIZERS.count(dsi.OPTIMIZERS["SMMF"]) == 1
    assert ZERO_SUPPORTED_OPTIMIZERS.count(dsi.OPTIMIZERS["Alada"]) == 1
    assert not hasattr(torch.optim, "SMMF") and not hasattr(torch.optim, "Alada")


def test_names_resolve_case_insensitively_and_lists_become_tuples():
    import torch

    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = dsi.build_optimizer("alada", params, {"lr": 1e-3, "betas": [0.8, 0.9]})
    assert type(optimizer).__name__ == "Alada" and optimizer.defaults["betas"] == (0.8, 0.9)
    assert type(dsi.build_optimizer("SMMF", params, None)).__name__ == "SMMF"


def test_unknown_params_list_the_constructor_arguments():
    import torch

    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"unknown params \['max_grad_norm', 'torch_adam'\]; Alada accepts lr, betas, eps, weight_decay, momentum_in_grad, check_finite"):
        dsi.build_optimizer("Alada", params, {"torch_adam": True, "max_grad_norm": 1.0})


def test_momentum_in_grad_is_refused_before_deepspeed_wraps_the_optimizer():
    """DeepSpeed replaces gradients every step and does not checkpoint them: the momentum Alada
    would keep there survives neither, so the engine refuses it, from the ds_config or a client."""
    import torch

    from dist_memopt.integrations.deepspeed import hooks

    class Engine:
        def optimizer_name(self):
            return "Alada"

        def optimizer_params(self):
            return {"momentum_in_grad": True}

    params = [torch.nn.Parameter(torch.zeros(3))]
    wrapped = []
    refused = r"Alada\(momentum_in_grad=True\) cannot run under DeepSpeed.*use momentum_in_grad=False"
    with pytest.raises(ValueError, match=refused):
        hooks._build_by_name(lambda self, model_parameters: None)(Engine(), params)
    configure = hooks._attach_after_wrapping(lambda self, client, model_parameters: wrapped.append(client))
    with pytest.raises(ValueError, match=refused):
        configure(Engine(), dsi.OPTIMIZERS["Alada"](params, momentum_in_grad=True), params)
    assert not wrapped


def test_hf_auto_adam_values_for_alada_warn():
    """HF Trainer fills "betas": "auto" / "eps": "auto" with its Adam defaults, not Alada's."""
    import warnings

    import torch

    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.warns(UserWarning, match=r'Alada got HF Trainer \("auto" in the ds_config\)\'s Adam values \(betas=\(0.9, 0.999\), eps=1e-08\)'):
        dsi.build_optimizer("Alada", params, {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dsi.build_optimizer("Alada", params, {"betas": [0.9, 0.9], "eps": 1e-16})
        dsi.build_optimizer("SMMF", params, {"eps": 1e-8})


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train.py", "--x", "1"], ("train.py", False, ["train.py", "--x", "1"])),
        (["--local_rank=1", "train.py", "--x"], ("train.py", False, ["train.py", "--local_rank=1", "--x"])),
        (["--local_rank", "0", "-m", "pkg.train"], ("pkg.train", True, ["pkg.train", "--local_rank", "0"])),
    ],
)
def test_runner_hands_the_launcher_arguments_to_the_script(argv, expected):
    assert split_arguments(argv) == expected


def test_runner_usage_error():
    with pytest.raises(SystemExit, match="usage"):
        split_arguments(["--local_rank=0"])


def test_runner_imports_the_integration_before_the_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "import dist_memopt.integrations.deepspeed.hooks as hooks\n"
        "print('installed', hooks.installed(), sys.argv[1:])\n"
    )
    import dist_memopt

    root = os.path.dirname(os.path.dirname(os.path.abspath(dist_memopt.__file__)))
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "dist_memopt.integrations.deepspeed.run", "--local_rank=0", str(script), "--y"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    ).stdout
    assert "installed True ['--local_rank=0', '--y']" in out
