"""``jaxserve plan``: compile every bucket of the engine step for a TPU or GPU that is not there.

Before renting a v5e-8 or an H100, a researcher can ask: does my model, with these engine settings,
compile for that chip, and how many KV-cache tokens fit next to its weights?  ``plan`` answers from
the model's config alone (no weights are read or downloaded):

* the parameter tree and the KV cache are ``jax.ShapeDtypeStruct``s carrying the shardings the
  engine would give them on the target's compile-only devices (``jaxserve/targets.py``);
* the engine's own ``ModelRunner`` lowers and compiles the step of every bucket (or a representative
  subset) with the real compilers: XLA TPU + Mosaic, or XLA GPU + Triton + ptxas, with the Pallas
  attention kernel that ``attention_impl="auto"`` picks on that platform;
* ``compiled.memory_analysis()`` gives each program's temporary bytes per device; with the weights'
  and the cache's per-device bytes that says whether it fits the chip's memory, and how many KV
  tokens fit at ``memory_utilization``.

It proves that the programs compile and what they need in memory, not that they are fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np

from jaxserve.config import EngineConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BucketResult:
    decode: int  # decode rows of the bucket
    prefill_tokens: int  # prefill-chunk tokens of the bucket
    ok: bool
    seconds: float
    error: str | None = None
    temp_bytes: int | None = None  # per device, from memory_analysis()
    argument_bytes: int | None = None
    alias_bytes: int | None = None  # argument bytes reused by outputs (the donated cache)


@dataclasses.dataclass
class Plan:
    target: str
    topology: str
    mesh: dict[str, int] | None
    num_devices: int
    model_type: str
    num_params: int
    dtype: str
    attention_impl: str
    page_size: int
    num_pages: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    hbm_bytes: int  # per chip
    memory_utilization: float
    weight_bytes: int  # per chip
    kv_cache_bytes: int  # per chip, for num_pages
    kv_bytes_per_token: int  # per chip
    buckets: list[BucketResult]
    num_buckets: int  # of the engine (the plan may compile fewer)
    kv_cache_dtype: str = "auto"  # the KV cache's values (jaxserve/kv_cache.py kv_dtype)
    data_groups: int = 1  # data-parallel attention: each chip holds 1 / data_groups of the pages
    bucket_set: str = "all"  # which buckets were compiled (plan_buckets)

    @property
    def ok(self) -> bool:
        return all(b.ok for b in self.buckets)

    @property
    def max_temp_bytes(self) -> int:
        return max((b.temp_bytes or 0 for b in self.buckets), default=0)

    @property
    def total_bytes(self) -> int:
        """Per chip: weights + KV cache + the largest step's temporaries."""
        return self.weight_bytes + self.kv_cache_bytes + self.max_temp_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    @property
    def kv_tokens_fit(self) -> int:
        """KV tokens (per sequence slot summed over all) that fit at ``memory_utilization``."""
        from jaxserve.kv_cache import kv_pages_for_memory

        return kv_pages_for_memory(bytes_limit=self.hbm_bytes, memory_utilization=self.memory_utilization,
                                   weight_bytes=self.weight_bytes, temp_bytes=self.max_temp_bytes,
                                   page_bytes_per_device=self.kv_bytes_per_token, data_groups=self.data_groups)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(ok=self.ok, fits=self.fits, max_temp_bytes=self.max_temp_bytes, total_bytes=self.total_bytes,
                   kv_tokens_fit=self.kv_tokens_fit)
        return out


def load_model_config(model: str) -> ModelConfig:
    """A model's config from a Hugging Face directory, a ``config.json`` file, a ``.gguf`` file or
    ``"smollm2"``: no weights are read."""
    from jaxserve.gguf_loader import is_gguf_path, resolve_model_path

    path = resolve_model_path(model)
    if is_gguf_path(path):
        from jaxserve.gguf_loader import model_config_from_gguf, open_gguf, read_metadata

        reader = open_gguf(path)
        return model_config_from_gguf(read_metadata(reader), {t.name for t in reader.tensors})
    if os.path.isdir(path):
        return ModelConfig.from_dir(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model: {model!r} is neither a model directory nor a config file")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"model: could not read {path}: {e}") from e
    from transformers import AutoConfig

    raw = dict(raw)
    model_type = raw.pop("model_type", None)
    try:
        hf = AutoConfig.for_model(model_type, **raw)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise ValueError(f"model_type: {model_type!r} in {path}: {e}") from e
    return ModelConfig.from_hf(hf)


def abstract_params(cfg: ModelConfig, dtype: Any) -> dict[str, Any]:
    """The model's parameter tree as ``ShapeDtypeStruct``s (shapes from the Flax module itself)."""
    import jax
    import jax.numpy as jnp

    from jaxserve import kv_cache
    from jaxserve.model import AttentionMetadata, CausalLM

    def init():
        t, s = 4, 1
        meta = AttentionMetadata(slot_mapping=jnp.zeros(t, jnp.int32), query_start_loc=jnp.zeros(s + 1, jnp.int32),
                                 seq_lens=jnp.zeros(s, jnp.int32), block_tables=jnp.zeros((s, 1), jnp.int32),
                                 num_seqs=jnp.int32(0))
        cache = jnp.zeros(kv_cache.cache_shape(cfg, 1, 8), dtype)
        return CausalLM(cfg, dtype).init(jax.random.key(0), jnp.zeros(t, jnp.int32), jnp.zeros(t, jnp.int32), cache,
                                         meta, jnp.zeros(s, jnp.int32))["params"]

    return jax.eval_shape(init)


def representative_buckets(runner) -> list[tuple[int, int]]:
    """The largest decode-only, the largest prefill-only and the largest mixed bucket."""
    d, t = runner.decode_buckets[-1], runner.prefill_buckets[-1]
    return [(d, 0), (0, t), (d, t)]


BUCKET_SETS = ("all", "representative", "largest")


def plan_buckets(runner, which: str) -> list[tuple[int, int]]:
    """The buckets a plan compiles: ``"all"`` of the engine's, the ``"representative"`` three, or the
    ``"largest"`` (mixed) one alone: one program that holds both the decode and the prefill rows' attention
    and the most tokens."""
    if which == "all":
        return list(runner.buckets)
    return representative_buckets(runner)[-1:] if which == "largest" else representative_buckets(runner)


def make_plan(model: str | ModelConfig, target: str, *, topology: str | None = None,
              mesh_shape: dict[str, int] | None = None, memory_utilization: float = 0.9,
              buckets: str = "all", engine_config: EngineConfig | None = None, progress: bool = True) -> Plan:
    """Compile the engine step of ``model`` for ``target`` (see the module docstring).

    ``mesh_shape``: ``{"data": D, "model": M}`` (default: one chip, no mesh, exactly the program the
    engine runs with ``mesh_shape=None``); ``buckets``: ``"all"``, ``"representative"`` or ``"largest"`` (``plan_buckets``);
    ``engine_config``: the engine's settings (``dtype="auto"`` means bfloat16 here; the KV cache, unless
    ``num_pages`` is set, gets what ``memory_utilization`` of the chip leaves after the weights and a
    provisional 10% for the step's temporaries)."""
    import jax
    from jax.sharding import NamedSharding, SingleDeviceSharding

    from jaxserve import kv_cache, sharding, targets
    from jaxserve.model_runner import ModelRunner
    from jaxserve.weights import NP_DTYPES

    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization: must be in (0, 1], got {memory_utilization!r}")
    if buckets not in BUCKET_SETS:
        raise ValueError(f"buckets: must be one of {', '.join(BUCKET_SETS)}, got {buckets!r}")
    cfg = model if isinstance(model, ModelConfig) else load_model_config(model)
    ec = dataclasses.replace(engine_config or EngineConfig())
    if ec.dtype == "auto":
        ec.dtype = "bfloat16"
    if mesh_shape is not None:
        ec.mesh_shape = mesh_shape
    ec.validate()
    dtype = NP_DTYPES[ec.dtype]
    n = 1 if ec.mesh_shape is None else ec.mesh_shape["data"] * ec.mesh_shape["model"]
    topology = topology or targets.default_topology(target, n)
    tg = targets.get_target(target, topology)
    if n > tg.num_devices:
        raise ValueError(f"mesh_shape: {n} devices needed, topology {topology} of {target} has {tg.num_devices}")

    if ec.mesh_shape is None:
        mesh, run_cfg, model_axis = None, cfg, 1
        device = SingleDeviceSharding(tg.devices[0])
        params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                        abstract_params(cfg, dtype))
        leaf_sharding = lambda ndim: device  # noqa: E731
    else:
        mesh = sharding.make_mesh(ec.mesh_shape, devices=tg.devices)
        model_axis = ec.mesh_shape["model"]
        run_cfg = sharding.sharded_model_config(cfg, model_axis)
        shardings = sharding.param_shardings(mesh, run_cfg)
        params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                        abstract_params(run_cfg, dtype), shardings)
        leaf_sharding = sharding.leaf_cache_sharding(mesh)
    kv_dtype = kv_cache.kv_dtype(ec.kv_cache_dtype, dtype)
    weight_bytes = kv_cache.per_device_bytes(params)
    max_model_len = ec.max_model_len or cfg.max_position_embeddings
    page_bytes = kv_cache.device_page_bytes(run_cfg, ec.page_size, kv_dtype, model_axis)  # per chip
    if ec.num_pages is not None:
        num_pages = ec.num_pages
    else:
        # The engine's sum (kv_cache.kv_pages_for_memory), with 10% of what the weights leave as a
        # provisional allowance for the temporaries (not compiled yet).
        budget = tg.hbm_bytes * memory_utilization - weight_bytes
        num_pages = kv_cache.kv_pages_for_memory(bytes_limit=tg.hbm_bytes, memory_utilization=memory_utilization,
                                                 weight_bytes=weight_bytes, temp_bytes=int(0.1 * max(budget, 0)),
                                                 page_bytes_per_device=page_bytes, data_groups=ec.data_groups)
        if num_pages < 1:
            raise ValueError(f"memory_utilization: the weights ({weight_bytes / 2**30:.2f} GiB per chip) leave no "
                             f"room for a KV cache in {memory_utilization:.0%} of {target}'s "
                             f"{tg.hbm_bytes / 2**30:.0f} GiB; use more chips (--mesh-model) or set --num-pages")
    cache = kv_cache.cache_structs(run_cfg, num_pages, ec.page_size, kv_dtype, tg.platform, leaf_sharding)
    runner = ModelRunner(run_cfg, ec, params, cache, dtype, max_model_len, num_pages, mesh=mesh,
                         platform=tg.platform)
    keys = plan_buckets(runner, buckets)
    results = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(keys), desc=f"compiling for {target} {topology}", unit="bucket")
    for key in keys:
        t0 = time.perf_counter()
        try:
            with jax.default_device(tg.devices[0]):  # Pallas lowers for the default device's chip
                exe = runner.compile_bucket(key)
            mem = exe.memory_analysis()
            res = BucketResult(key[0], key[1], True, time.perf_counter() - t0,
                               temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
                               alias_bytes=int(mem.alias_size_in_bytes))
        except Exception as e:  # noqa: BLE001 - the compiler's message is the result
            res = BucketResult(key[0], key[1], False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
        results.append(res)
        if bar is not None:
            bar.set_postfix_str(f"({key[0]}, {key[1]}) {'ok' if res.ok else 'FAILED'} {res.seconds:.1f}s")
            bar.update()
    if bar is not None:
        bar.close()
    return Plan(target=target, topology=topology, mesh=ec.mesh_shape, num_devices=n, model_type=cfg.model_type,
                num_params=cfg.num_params(), dtype=ec.dtype, attention_impl=runner.attention_impl,
                page_size=ec.page_size, num_pages=num_pages, max_model_len=max_model_len,
                max_num_seqs=ec.max_num_seqs, max_num_batched_tokens=ec.max_num_batched_tokens,
                hbm_bytes=tg.hbm_bytes, memory_utilization=memory_utilization, weight_bytes=weight_bytes,
                kv_cache_bytes=kv_cache.per_device_bytes(cache), kv_bytes_per_token=page_bytes // ec.page_size,
                buckets=results, num_buckets=runner.num_buckets, kv_cache_dtype=kv_dtype.name,
                data_groups=ec.data_groups, bucket_set=buckets)


def format_plan(plan: Plan) -> str:
    gib = 2**30
    lines = [f"{plan.model_type} ({plan.num_params / 1e9:.2f}B parameters, {plan.dtype}) on {plan.target} "
             f"{plan.topology}, mesh {plan.mesh or 'none (one chip)'}, attention {plan.attention_impl}", ""]
    lines.append(f"{'bucket (decode, prefill tokens)':<34}{'compiled':<10}{'seconds':>8}{'temp MiB':>10}")
    for b in plan.buckets:
        temp = f"{b.temp_bytes / 2**20:.1f}" if b.temp_bytes is not None else "-"
        lines.append(f"{f'({b.decode}, {b.prefill_tokens})':<34}{'yes' if b.ok else 'FAILED':<10}"
                     f"{b.seconds:>8.1f}{temp:>10}")
    compiled = len(plan.buckets)
    lines.append(f"{compiled} of the engine's {plan.num_buckets} buckets compiled"
                 f"{'' if compiled == plan.num_buckets else f' (the {plan.bucket_set} subset)'}")
    lines += ["", f"per chip ({plan.hbm_bytes / gib:.0f} GiB HBM):",
              f"  weights           {plan.weight_bytes / gib:8.2f} GiB",
              f"  KV cache          {plan.kv_cache_bytes / gib:8.2f} GiB  ({plan.num_pages} pages x {plan.page_size} "
              f"tokens = {plan.num_pages * plan.page_size:,} tokens, {plan.kv_cache_dtype})",
              f"  largest temporary {plan.max_temp_bytes / gib:8.2f} GiB",
              f"  total             {plan.total_bytes / gib:8.2f} GiB  ({'fits' if plan.fits else 'DOES NOT FIT'})",
              f"KV tokens that fit at memory utilization {plan.memory_utilization:.2f}: {plan.kv_tokens_fit:,} "
              f"({plan.kv_tokens_fit // max(plan.max_model_len, 1):,} sequences of max_model_len "
              f"{plan.max_model_len:,})"]
    for b in plan.buckets:
        if not b.ok:
            lines += ["", f"bucket ({b.decode}, {b.prefill_tokens}) failed:", b.error or ""]
    return "\n".join(lines)
