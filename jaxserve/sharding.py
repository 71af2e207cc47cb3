"""Multi-device serving: the device mesh, the PartitionSpec of every weight and of the KV cache.

jaxserve does not partition anything by hand: it names a ``NamedSharding`` for
the weights, the KV cache and the step's inputs and outputs, and XLA's SPMD
partitioner (GSPMD) inserts the collectives.  The only manual region is the
attention (cache write + ragged paged attention), run under ``jax.shard_map``
over the ``model`` axis (and ``data``, see below) so that its gathers and
einsums stay local to each device's KV heads (and data group's pages).

The mesh has two axes:

``model`` (tensor parallelism, Megatron layout)
    * ``qkv_proj`` kernel ``[H, Hkv, G+2, D]`` (each KV head's G query heads,
      then its K and V) is split on the KV-head axis, so every shard holds whole
      GQA groups and q/k/v stay consistent for any ``M`` dividing ``Hkv``;
    * ``o_proj`` ``[Hq*D, H]`` is split on its input (head) rows: its partial
      sums are all-reduced by XLA;
    * ``gate_up_proj`` kernel ``[H, 2, I]`` and ``down_proj`` ``[I, H]`` are split
      on the intermediate axis ``I`` (column- then row-parallel MLP);
    * the embedding ``[V, H]`` and the LM head ``[H, V]`` are split on the
      **vocabulary**: the lookup becomes a masked local gather plus an
      all-reduce, and the LM head yields vocab-sharded logits, which are then
      gathered (``[num_seqs, V]``, small) so that sampling sees whole rows.  The
      vocabulary is chosen over the hidden axis because the LM head is the
      largest matmul of a decode step for small models and splitting it on ``V``
      needs no reduction before the gather.  If ``V`` does not divide by ``M``
      they are split on the hidden axis instead (replicated if neither divides);
    * a mixture of experts' ``gate_up [E, H, 2, I]`` and ``down [E, I, H]`` are split on the
      **expert** axis (expert parallelism: each device holds ``E / M`` whole experts and runs them on
      the token copies routed to them, ``jaxserve/moe.py``); the router is replicated;
    * norms (and q/k norms) are replicated;
    * every layer weight has a leading layer axis (the model scans over the
      layers), never split;
    * the KV cache ``[layers, Hkv, pages, page_size, 2D]`` (``kv_cache.py``) is
      split on KV heads.

    Head counts: ``num_attention_heads`` must divide by ``M``.  If
    ``num_key_value_heads`` does not but ``M`` is a multiple of it (GQA with
    more devices than KV heads), each KV head is **replicated** ``M / Hkv``
    times, as vLLM and Megatron do: the model is run as the equivalent model
    with ``M`` KV heads (K/V weights copied, each query group split), so the
    KV cache holds one head per device.  Anything else is a ``ValueError``.

``data`` (the batch; data-parallel attention)
    A step is one ragged batch of token rows (decode tokens, then prefill
    chunks).  With ``D = 1`` the dense layers' rows are simply whole.  With
    ``D > 1`` each of the D *data groups* (a row of the mesh, ``M`` devices)
    owns a disjoint set of sequences and a disjoint ``1 / D`` of the KV pages,
    as vLLM/SGLang's "DP attention":

    * the KV cache's ``pages`` axis is split on ``data`` (``cache_spec``): the
      devices of group ``g`` hold pages ``[g * P / D, (g + 1) * P / D)``, and the
      page allocator gives a sequence of group ``g`` pages of that range only
      (``kv_cache.PageAllocator(num_groups=D)``); the scheduler assigns each
      sequence a group at admission (the least loaded) and gives every group its
      own ``max_num_seqs / D`` slots and ``max_num_batched_tokens / D`` budget;
    * a step's rows are D equal blocks, block ``g`` group ``g``'s own decodes and
      prefill chunks (``model_runner``), and the attention metadata has a leading
      group axis in group-local rows and page ids; the attention (cache write +
      ragged paged attention) runs under the ``shard_map`` over ``(data, model)``,
      each device calling the unchanged kernel on its group's rows, pages and
      metadata, its KV heads;
    * the embedding, projections, MLP (and experts) run on the rows split on
      ``data`` by GSPMD; the LM head's logits are gathered for sampling.

    So ``data`` divides the KV cache each device holds by ``D`` (the weights are
    still replicated across groups): more sequences, or a model with fewer KV
    heads than chips (``model`` at most ``Hkv`` without replication).
    ``max_num_seqs``, ``max_num_batched_tokens`` and ``num_pages`` must divide by
    ``D``; speculative decoding and static batching are refused with ``D > 1``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve import kv_cache
from jaxserve.config import ModelConfig

logger = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)


def normalize_mesh_shape(mesh_shape: Mapping[str, int]) -> dict[str, int]:
    """``{"data": D, "model": M}`` with defaults of 1; raises ValueError on unknown axes or bad sizes."""
    if not isinstance(mesh_shape, Mapping):
        raise ValueError(f"mesh_shape: expected a dict like {{'data': 1, 'model': 8}}, got {mesh_shape!r}")
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh_shape: unknown axis {sorted(unknown)[0]!r}; axes are 'data' and 'model'")
    shape = {axis: mesh_shape.get(axis, 1) for axis in MESH_AXES}
    for axis, size in shape.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh_shape: {axis!r} must be a positive integer, got {size!r}")
    return shape


def make_mesh(mesh_shape: Mapping[str, int], devices: list[Any] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over the first ``D*M`` devices (all processes' devices under
    ``jax.distributed``), axes in Auto mode so that XLA propagates shardings."""
    shape = normalize_mesh_shape(mesh_shape)
    devices = list(jax.devices()) if devices is None else list(devices)
    n = shape[DATA] * shape[MODEL]
    if n > len(devices):
        raise ValueError(f"mesh_shape: data={shape[DATA]} x model={shape[MODEL]} needs {n} devices, "
                         f"{len(devices)} available")
    if n == len(devices):
        from jax.experimental import mesh_utils

        # Topology-aware order on TPU (model axis along the fastest interconnect); a plain reshape on CPU.
        grid = mesh_utils.create_device_mesh((shape[DATA], shape[MODEL]), devices=devices)
    else:
        grid = np.asarray(devices[:n], dtype=object).reshape(shape[DATA], shape[MODEL])
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def kv_replication(cfg: ModelConfig, model_axis: int) -> int:
    """How many times each KV head is replicated on a ``model`` axis of this size (1: none).

    Raises ValueError when the head counts cannot be split over ``model_axis``."""
    hq, hkv, m = cfg.num_heads, cfg.num_kv_heads, model_axis
    if hq % m:
        raise ValueError(f"mesh_shape: num_attention_heads ({hq}) must be divisible by the 'model' "
                         f"axis ({m})")
    if cfg.is_moe:
        if cfg.num_experts % m:
            raise ValueError(f"mesh_shape: num_experts ({cfg.num_experts}) must be divisible by the 'model' "
                             f"axis ({m}): the experts are split over it")
    elif cfg.intermediate_size % m:
        raise ValueError(f"mesh_shape: intermediate_size ({cfg.intermediate_size}) must be divisible "
                         f"by the 'model' axis ({m})")
    if hkv % m == 0:
        return 1
    if m % hkv == 0:
        return m // hkv
    raise ValueError(f"mesh_shape: num_key_value_heads ({hkv}) must divide, or be a multiple of, the "
                     f"'model' axis ({m})")


def sharded_model_config(cfg: ModelConfig, model_axis: int) -> ModelConfig:
    """The model as it runs on a ``model`` axis of this size: with replicated KV heads if needed."""
    r = kv_replication(cfg, model_axis)
    if r == 1:
        return cfg
    logger.info("replicating each of the %d KV heads %d times for a 'model' axis of %d",
                cfg.num_kv_heads, r, model_axis)
    return dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * r)


def replicate_kv_heads(params: dict[str, Any], cfg: ModelConfig, replication: int) -> dict[str, Any]:
    """Rewrite the q/k/v projections of ``cfg`` as those of the equivalent model with
    ``num_kv_heads * replication`` KV heads (each query group split, its K and V copied).

    Works on numpy and on jax arrays (under jit, with output shardings, for a restore)."""
    if replication == 1:
        return params
    xp = np if all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params)) else jnp
    r, hkv = replication, cfg.num_kv_heads
    g = cfg.num_heads // hkv

    def expand(x, lead: tuple[int, ...]):
        # x [..., Hkv, G+2, D] -> [..., Hkv*r, G/r+2, D]
        d = x.shape[-1]
        q = x[..., :g, :].reshape(*lead, hkv, r, g // r, d)
        kv = xp.broadcast_to(x[..., None, g:, :], (*lead, hkv, r, 2, d))
        return xp.concatenate([q, kv], axis=-2).reshape(*lead, hkv * r, g // r + 2, d)

    out = dict(params)
    layers = dict(out["layers"])
    qkv = dict(layers["qkv_proj"])
    qkv["kernel"] = expand(qkv["kernel"], qkv["kernel"].shape[:2])  # [L, H, Hkv, G+2, D]
    # the bias and int8 scales (jaxserve/quant.py): [L, Hkv, G+2, D]; group-wise scales and zero points
    # (GGUF blocks): [L, H/G, Hkv, G+2, D]
    for name in ("bias", "scale", "zero"):
        if name in qkv:
            qkv[name] = expand(qkv[name], qkv[name].shape[:-3])
    layers["qkv_proj"] = qkv
    out["layers"] = layers
    return out


def _vocab_spec(cfg: ModelConfig, m: int, vocab_axis: int) -> P:
    """Spec of a [V, H] (vocab_axis=0) or [H, V] (vocab_axis=1) matrix: split on V, else on H."""
    spec: list[Any] = [None, None]
    if cfg.vocab_size % m == 0:
        spec[vocab_axis] = MODEL
    elif cfg.hidden_size % m == 0:
        spec[1 - vocab_axis] = MODEL
    return P(*spec)


def param_specs(cfg: ModelConfig, model_axis: int) -> dict[str, Any]:
    """PartitionSpec of every parameter of ``model.CausalLM`` (``cfg`` as it runs, see
    ``sharded_model_config``), mirroring the parameter tree."""
    m = model_axis
    specs: dict[str, Any] = {"embed": {"embedding": _vocab_spec(cfg, m, 0)}, "final_norm": {"scale": P()}}
    # Layer weights: a leading (scanned) layer axis, never split.
    layer: dict[str, Any] = {
        "input_norm": {"scale": P(None)},
        "qkv_proj": {"kernel": P(None, None, MODEL, None, None)},
        "o_proj": {"kernel": P(None, MODEL, None)},
        "post_attention_norm": {"scale": P(None)},
    }
    if cfg.is_moe:  # expert parallel: whole experts on each device, the router replicated
        layer["moe"] = {"router": {"kernel": P(None, None, None)},
                        "gate_up": P(None, MODEL, None, None, None),  # [L, E, H, 2, I]
                        "down": P(None, MODEL, None, None)}  # [L, E, I, H]
    else:
        layer["gate_up_proj"] = {"kernel": P(None, None, None, MODEL)}
        layer["down_proj"] = {"kernel": P(None, MODEL, None)}
    if cfg.sandwich_norms:
        layer["pre_feedforward_norm"] = {"scale": P(None)}
        layer["post_feedforward_norm"] = {"scale": P(None)}
    if cfg.attention_bias:
        layer["qkv_proj"]["bias"] = P(None, MODEL, None, None)
    if cfg.qk_norm:
        layer["q_norm"] = {"scale": P(None)}
        layer["k_norm"] = {"scale": P(None)}
    specs["layers"] = layer
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = {"kernel": _vocab_spec(cfg, m, 1)}
    return specs


CACHE_SPEC = kv_cache.partition_spec(MODEL)  # KV heads split on "model" (layout: jaxserve/kv_cache.py)


def param_shardings(mesh: Mesh, cfg: ModelConfig, quantized: bool = False,
                    params: dict[str, Any] | None = None) -> dict[str, Any]:
    """NamedShardings of ``param_specs`` (``quantized``: with the int8 scales of ``jaxserve/quant.py``;
    ``params``: the tree they are for, whose group-wise GGUF scales split like their kernels)."""
    specs = param_specs(cfg, mesh.shape[MODEL])
    if quantized:
        from jaxserve import quant

        specs = quant.param_specs(specs, params, mesh.shape[MODEL])
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def data_groups(mesh: Mesh | None) -> int:
    """Data groups of data-parallel attention: the ``data`` axis (1: no mesh, or no data axis)."""
    return 1 if mesh is None else mesh.shape[DATA]


def cache_spec(mesh: Mesh, cache: Any = None) -> Any:
    """The cache's PartitionSpec on ``mesh`` (one per leaf with a ``cache``): KV heads on ``model``, and
    pages on ``data`` when there is more than one data group (data-parallel attention)."""
    return kv_cache.partition_spec(MODEL, cache, DATA if data_groups(mesh) > 1 else None)


def cache_sharding(mesh: Mesh, cache: Any = None) -> Any:
    """The cache's sharding; with a ``cache`` (arrays or structs), one for each leaf (the int8 pair)."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), cache_spec(mesh, cache),
                                  is_leaf=lambda x: isinstance(x, P))


def leaf_cache_sharding(mesh: Mesh):
    """The sharding of a cache leaf of a given rank (``cache_spec``): for ``allocate_kv_cache``."""
    return lambda ndim: NamedSharding(mesh, cache_spec(mesh, jax.ShapeDtypeStruct((1,) * ndim, np.float32)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows_sharding(mesh: Mesh, num_rows: int) -> NamedSharding:
    """Token rows split on ``data`` when they divide evenly, else replicated."""
    if num_rows and num_rows % mesh.shape[DATA] == 0:
        return NamedSharding(mesh, P(DATA))
    return replicated(mesh)


def put_params(params: dict[str, Any], mesh: Mesh, cfg: ModelConfig) -> dict[str, Any]:
    """Place a host (numpy) parameter tree of the model as it runs (``cfg``) on the mesh: each device
    receives only its shards, no device ever holds a whole sharded weight."""
    from jaxserve import quant

    return jax.device_put(params, param_shardings(mesh, cfg, quant.is_quantized(params), params))


def allocate_sharded_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any, mesh: Mesh):
    """The zeroed cache, created directly in its KV-head sharding."""
    return kv_cache.allocate_kv_cache(cfg, num_pages, page_size, dtype, leaf_cache_sharding(mesh))


def constrain(x: jax.Array, mesh: Mesh | None, *spec: Any) -> jax.Array:
    """``with_sharding_constraint`` that is a no-op without a mesh, and drops the ``data`` axis
    from a dimension it does not divide (a bucket's row count need not be a multiple of D)."""
    if mesh is None:
        return x
    fixed = []
    for dim, axis in zip(x.shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
            axis = None
        fixed.append(axis)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*fixed)))


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host value that every process holds in full (multi-host inputs)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


__all__ = ["DATA", "MODEL", "MESH_AXES", "CACHE_SPEC", "make_mesh", "normalize_mesh_shape", "kv_replication",
           "sharded_model_config", "replicate_kv_heads", "param_specs", "param_shardings", "cache_sharding",
           "replicated", "rows_sharding", "data_groups", "cache_spec", "put_params", "allocate_sharded_kv_cache", "constrain",
           "global_array"]
