"""One set of defaults (the config dataclasses), validated where they are built."""

from __future__ import annotations

import argparse

import pytest

from openlora.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig


@pytest.mark.parametrize("make,field", [
    (lambda: CacheConfig(block_size=0), "block_size"),
    (lambda: CacheConfig(num_blocks=0), "num_blocks"),
    (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs"),
    (lambda: SchedulerConfig(max_num_batched_tokens=-1), "max_num_batched_tokens"),
    (lambda: SchedulerConfig(adapter_time_slice_s=0), "adapter_time_slice_s"),
    (lambda: LoRAConfig(max_loras=0), "max_loras"),
    (lambda: LoRAConfig(max_lora_rank=True), "max_lora_rank"),
    (lambda: EngineConfig(model=None, dtype="float64"), "dtype"),  # type: ignore[arg-type]
    (lambda: EngineConfig(model=None, num_threads=0), "num_threads"),  # type: ignore[arg-type]
])
def test_bad_values_name_their_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_the_cli_takes_its_defaults_from_the_dataclasses():
    from openlora.server.cli import add_serve_command

    p = argparse.ArgumentParser()
    add_serve_command(p.add_subparsers())
    a = p.parse_args(["serve"])
    assert (a.max_num_seqs, a.max_num_batched_tokens, a.max_waiting) == (
        SchedulerConfig.max_num_seqs, SchedulerConfig.max_num_batched_tokens, SchedulerConfig.max_waiting)
    assert (a.max_loras, a.max_cpu_loras, a.max_lora_rank) == (
        LoRAConfig.max_loras, LoRAConfig.max_cpu_loras, LoRAConfig.max_lora_rank)
    assert (a.kv_cache_memory, a.dtype, a.seed) == (CacheConfig.kv_cache_memory_bytes, EngineConfig.dtype,
                                                     EngineConfig.seed)
