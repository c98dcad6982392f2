"""Shared by the Ray Serve tests: a tiny model with adapters on disk, and a running two-replica
application on 127.0.0.1 (one Ray cluster, stopped with ray.shutdown(): only its own processes)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers import make_peft_adapter

# One thread and a small KV cache per replica: two replicas share this machine's cores with the tests.
ENGINE = dict(num_threads=1, max_num_seqs=8, kv_cache_memory=16 << 20, max_loras=2, max_model_len=2048)


def tiny_model_with_adapters(root: Path, adapters: tuple[str, ...], seed: int) -> Path:
    """root/tiny (the test model) and root/adapters/<name> for each name."""
    from tiny_models import make_tiny_model

    model = root / "tiny"
    model.mkdir()
    make_tiny_model(model, max_position_embeddings=2048)
    for i, name in enumerate(adapters):
        make_peft_adapter(model, root / "adapters" / name, seed=seed + i)
    return model


@contextmanager
def ray_app(opts: Any, port: int, replicas: int = 2) -> Iterator[Any]:
    """A local Ray cluster running `opts` as the openlora Serve application on 127.0.0.1:port."""
    import ray
    from ray import serve

    from openlora.scale.deploy import deploy, start_ray, stop

    start_ray(None)
    app = None
    try:
        app = deploy(opts, replicas, "127.0.0.1", port)
        yield app
    finally:
        if app is not None:
            stop(app)
        serve.shutdown()
        ray.shutdown()
