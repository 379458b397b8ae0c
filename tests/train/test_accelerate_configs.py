"""configs/accelerate/: one accelerate config per supported launch, each read by accelerate's own loader,
and ``python -m preftune`` (the module ``accelerate launch -m preftune`` starts)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"
# name -> (accelerate's distributed_type, the settings that make it what its name says)
EXPECTED = {
    "single": ("NO", {}),
    "ddp": ("MULTI_GPU", {}),
    "fsdp2": ("FSDP", {"fsdp_version": 2, "fsdp_offload_params": False}),
    "fsdp2_offload": ("FSDP", {"fsdp_version": 2, "fsdp_offload_params": True}),
    "deepspeed_zero2": ("DEEPSPEED", {"zero_stage": 2}),
    "deepspeed_zero3": ("DEEPSPEED", {"zero_stage": 3}),
    "multinode_fsdp2": ("FSDP", {"fsdp_version": 2, "fsdp_offload_params": False}),
}


def test_one_config_per_launch():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    kind, settings = EXPECTED[name]
    assert cfg.distributed_type.value == kind
    # preftune sets precision itself (--precision); a config that also set it would be refused.
    assert cfg.mixed_precision == "no" and cfg.use_cpu is False
    plugin = cfg.fsdp_config if kind == "FSDP" else cfg.deepspeed_config
    assert {k: plugin.get(k) for k in settings} == settings
    if kind == "DEEPSPEED":  # preftune accumulates micro-batches itself
        assert plugin["gradient_accumulation_steps"] == 1
    if name.startswith("multinode"):
        assert (cfg.num_machines, cfg.num_processes, cfg.rdzv_backend) == (2, 16, "c10d")
    else:
        assert cfg.num_machines == 1


def test_python_dash_m_preftune_is_the_command_line():
    out = subprocess.run([sys.executable, "-m", "preftune", "train", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--resume" in out.stdout and "--model" in out.stdout
