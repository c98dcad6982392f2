"""select_kernels: one plan per engine, one log line, forced choices validated (KernelConfig)."""

from __future__ import annotations

import logging

import pytest
import torch

from openlora.config import KERNEL_CHOICES, KernelConfig
from openlora.kernels import attention_cpu, decoder, fused_ops
from openlora.kernels.select import linear_usable, select_kernels

CPU = torch.device("cpu")


def test_kernel_config_validates_and_parses() -> None:
    assert KernelConfig.parse("") == KernelConfig()
    assert KernelConfig.parse(" lora=torch , layer-loop=python") == KernelConfig(lora="torch", layer_loop="python")
    with pytest.raises(ValueError, match="KernelConfig.attention must be one of auto, paged, sdpa, got 'flash'"):
        KernelConfig(attention="flash")
    with pytest.raises(ValueError, match="PART=CHOICE"):
        KernelConfig.parse("lora")
    with pytest.raises(ValueError, match="got 'gpu=on'"):
        KernelConfig.parse("gpu=on")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_plan_takes_what_runs_here_and_logs_one_line(dtype, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="openlora.kernels"):
        plan = select_kernels(KernelConfig(), CPU, dtype)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels: ")]
    assert lines == [f"kernels: {plan.describe()} (cpu, {str(dtype)[6:]})"]
    assert linear_usable(plan.linear, CPU, dtype) is None
    # auto prefers our kernels in this order, and falls back to torch only when none runs
    ours = ("amx", "bf16-panels", "f32-panels", "dnnl-packed")
    first = next((n for n in ours if linear_usable(n, CPU, dtype) is None), "torch")
    assert plan.linear == first
    assert plan.lora.name == ("cpp" if _builds("cpp") else "torch")
    assert plan.attention == ("paged" if attention_cpu.available() else "sdpa")
    assert plan.ops.enabled == fused_ops.available()
    loop_ok = plan.linear in decoder.BACKENDS and plan.paged_attention and plan.ops.enabled and decoder.available()
    assert plan.layer_loop == ("cpp" if loop_ok else "python")


def _builds(name: str) -> bool:
    from openlora.kernels.backend import make_backend

    try:
        make_backend(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_forced_choices_are_taken() -> None:
    plan = select_kernels(KernelConfig(linear="torch", lora="reference", attention="sdpa", fused_ops="off"),
                          CPU, torch.float32)
    assert (plan.linear, plan.lora.name, plan.attention, plan.ops, plan.layer_loop) == (
        "torch", "reference", "sdpa", fused_ops.COMPOSITES, "python")
    assert plan.describe() == "linear=torch lora=reference attention=sdpa fused=off loop=python"
    assert select_kernels(KernelConfig(lora="torch"), CPU, torch.float32).lora.name == "torch"


@pytest.mark.parametrize("forced,dtype,message", [
    (KernelConfig(linear="amx"), torch.float32, "linear=amx cannot run here: it runs torch.bfloat16 on the CPU only"),
    (KernelConfig(linear="f32-panels"), torch.bfloat16,
     "linear=f32-panels cannot run here: it runs torch.float32 on the CPU only"),
    (KernelConfig(attention="sdpa", layer_loop="cpp"), torch.float32, "layer_loop=cpp cannot run here"),
    (KernelConfig(fused_ops="off", layer_loop="cpp"), torch.float32, "layer_loop=cpp cannot run here"),
])
def test_forced_choice_that_cannot_run_is_a_start_up_error(forced, dtype, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        select_kernels(forced, CPU, dtype)


def test_cpp_loop_decided_per_step() -> None:
    plan = select_kernels(KernelConfig(), CPU, torch.float32)
    if plan.layer_loop != "cpp":
        assert not plan.cpp_loop_for(4, 4, False, False)  # never, whatever the step
        return
    assert plan.cpp_loop_for(4, 4, False, False)
    assert not plan.cpp_loop_for(40, 4, True, False)  # SDPA prompt chunks in the step: Python loop
    assert plan.cpp_loop_for(4, 4, False, True) == (plan.lora.name == "cpp")


def test_every_choice_is_documented_in_the_cli_help() -> None:
    from openlora.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    flat = " ".join(text.split())
    for part, choices in KERNEL_CHOICES.items():
        assert f"{part} ({'|'.join(choices)})" in flat
