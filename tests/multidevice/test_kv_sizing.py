"""The KV-cache sizing sums per device on a data=2 x model=4 mesh of 8 virtual devices."""

from __future__ import annotations

import jax
import numpy as np

from jaxserve import ModelConfig, kv_cache
from jaxserve import sharding
from jaxserve.weights import load_params


def test_per_device_sums_on_the_mesh(mha_dir):
    cfg = ModelConfig.from_dir(mha_dir)
    mesh = sharding.make_mesh({"data": 2, "model": 4})
    run_cfg = sharding.sharded_model_config(cfg, 4)
    host = load_params(mha_dir, cfg, np.float32)
    params = sharding.put_params(sharding.replicate_kv_heads(host, cfg, sharding.kv_replication(cfg, 4)), mesh,
                                 run_cfg)
    whole = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    weights = kv_cache.per_device_bytes(params)
    # Tensor parallel over 4: each device holds less than the whole, at least a quarter of it.
    assert whole / 4 <= weights < whole
    # Each device holds exactly its shard of the arrays as placed.
    assert weights == sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(params))

    page = kv_cache.device_page_bytes(run_cfg, 8, np.float32, 4)
    assert page * 4 == kv_cache.page_bytes(run_cfg, 8, np.float32)
    limit, temp = 64 << 20, 1 << 20
    # data 2: data-parallel attention, each device holds its data group's half of the pages
    pages = kv_cache.kv_pages_for_memory(bytes_limit=limit, memory_utilization=0.5, weight_bytes=weights,
                                         temp_bytes=temp, page_bytes_per_device=page, data_groups=2)
    cache = sharding.allocate_sharded_kv_cache(run_cfg, pages, 8, np.float32, mesh)
    on_device = kv_cache.per_device_bytes(cache)
    assert pages % 2 == 0
    assert on_device == cache.addressable_shards[0].data.nbytes == pages // 2 * page
    assert weights + temp + on_device <= 0.5 * limit < weights + temp + on_device + page
