"""The paged KV cache: a free-page allocator on the host and the one device array that holds K and V.

Host side: ``PageAllocator`` hands out page ids; each sequence keeps its list of
pages (its page table), and the position ``p`` of a sequence lives in slot
``p % page_size`` of page ``page_ids[p // page_size]``.

Device side (this module is the one place that owns the layout; the model, the
reference attention, both Pallas kernels, the sharding specs and the memory
planner all read it from here)::

    kv_cache: [num_layers, num_kv_heads, num_pages, page_size, 2 * head_dim]
               ^ scanned   ^ split on     ^ the page table   ^ K in lanes [:D],
                 by the      the 'model'    indexes this;      V in lanes [D:]
                 layer loop  mesh axis      split on 'data'
                                            (data-parallel attention)

Why this layout:

* **One array for all layers**, so the model's layers run under one
  ``lax.scan`` with the cache in the carry (updated in place, donated), and a
  kernel reads layer ``l`` by indexing, never by slicing out a copy.
* **KV head before the page**, so one page of one head, ``[page_size, 2*D]``,
  is a contiguous block whose two minor dimensions are whole: the TPU DMA of
  a page never slices a tiled dimension (the old ``[pages, page_size, Hkv, D]``
  layout sliced the head out of the second-minor dimension, which Mosaic
  rejects for packed 16-bit dtypes), and the Triton gather of a block of pages
  is a plain strided load.
* **K and V side by side on the lanes**: one write and one DMA per page fetch
  both, and with ``head_dim=64`` the minor dimension is 128 lanes wide instead
  of a half-empty 64 (TPU tiles lanes by 128, so a 64-wide minor dimension
  would take twice its size in HBM).

A ``page_size`` that is a multiple of the dtype's sublane packing (8 rows for
32-bit, 16 for 16-bit on TPU) keeps pages tile-aligned; the kernels check it.

On XLA CPU a 16-bit (bfloat16/float16) cache is *stored* as its uint16 bits
(``storage_dtype``): XLA CPU turns a scatter into a 16-bit float array into a
conversion of the whole array to float32 and back, which under the layer scan
is the whole cache of every layer, for every layer (a jitted 8-layer write of 64
tokens into a 4M-token bf16 cache: 1,060 ms, against 0.3 ms in float32).  On the
bits the scatter is in place; readers bitcast the few pages they gather
(``as_values``).

**8-bit caches** (``EngineConfig.kv_cache_dtype``, ``kv_dtype`` below):

* ``"fp8_e4m3"``: the same one array in ``float8_e4m3fn`` (values cast on write, clipped to the
  format's +-448; no scales), so exactly half the bytes of bfloat16.  Stored natively on every device
  (on XLA CPU as its uint8 bits, like the 16-bit caches); readers upcast to the query dtype before the
  dot (the dots themselves never run in fp8, so devices without fp8 arithmetic read it too).
* ``"int8"``: the cache is a pair ``(kv, scales)``: ``kv`` the array above in int8, and ``scales`` a
  float32 companion with the *same page indexing*::

      scales: [num_layers, num_kv_heads, num_pages, page_size, 2]   (K scale, V scale) of each slot

  one symmetric scale per token per KV head for K and one for V (``absmax / 127``; the value of
  lane ``j`` is ``kv[..., j] * scales[..., j // D]``).  Any index ``[l, h, page, slot]`` into the
  cache indexes the scales the same way, so a reader gathers both with the same indices
  (``read_kv``).  The scales cost 8 bytes per token and head against ``2 * D`` for K and V, so at
  equal bytes int8 holds ``4D / (2D + 8)`` times the tokens of bfloat16 (1.88x at D=64, 1.94x at
  D=128; fp8 holds exactly 2x).  On TPU the scales' minor dimension of 2 would be padded to a lane
  tile in HBM, so the TPU kernel does not read int8 (``kernels_pallas.KV8_KERNELS``: the engine uses
  the reference attention there); the GPU kernel and the reference read both 8-bit caches.

The engine, the step's donation and scan carry and the sharding treat the cache as a pytree (one
leaf or two); ``partition_spec`` gives each leaf its spec (KV heads split on axis 1 of both; with
data-parallel attention, pages split on axis 2 of both).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from kernels_pallas.ragged_paged_attention import as_values, read_kv, split_cache  # noqa: F401  (the readers)

logger = logging.getLogger(__name__)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


PageKey = tuple  # (hash of the previous page's key or None, the page's token ids)


class PageAllocator:
    """Hands out page ids, counts references, and (optionally) caches full pages by content.

    Sequences grow page by page and give them all back when done.  Pages are handed out for
    *contiguity*: a sequence's next page is the one after its last page when that is free, and a
    sequence's first page starts the largest run of free pages (at the run's middle when a page in use
    precedes the run, leaving that page's sequence the first half to grow into).  A sequence whose pages
    are adjacent has one [page_size, 2D] block after the other for each layer and KV head of the cache
    (the layout below), which the attention reads as one stream.  On the 2-core Xeon, 64 sequences
    decoded from 16-token prompts to 356 tokens took 39.3 / 39.4 ms a step with their pages adjacent (1.0
    run of pages a sequence) against 41.5 / 42.1 ms scattered by the free stack this replaced (24 runs)
    (``python bench/step_profile.py --model /work/models/56m --batches 64 --contexts 356 --grow-from 16
    --no-attention-off --steps 20``, the two allocators in turn, twice).  With prefix caching every *full*
    page is also registered under a key made of its tokens and the key of the
    page before it (a hash chain, so equal keys mean equal prefixes); a new
    sequence whose prompt starts with cached pages shares them (reference
    counts) instead of recomputing them.  A cached page nobody uses is
    *evictable*: it still counts as free, and allocation takes the least
    recently used one only when no never-cached page is left.

    ``num_groups`` > 1 (data-parallel attention, ``jaxserve/sharding.py``): the pages are split into
    that many equal contiguous ranges, group ``g`` owning ``[g * group_pages, (g + 1) * group_pages)``
    (the pages of data group ``g``'s cache shard).  A sequence takes all its pages from its own group
    (``grow``/``match_prefix`` take the group; freeing finds it from the page ids), each group with its
    own free list and prefix cache.  Page ids stay global.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False, num_groups: int = 1):
        if num_pages % num_groups:
            raise ValueError(f"num_pages: {num_pages} pages do not split into {num_groups} equal data groups")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_groups = num_groups
        self.group_pages = num_pages // num_groups
        gp = self.group_pages
        self._is_free = np.ones(num_pages, bool)  # never used, or released and not cached
        self._num_free = [gp] * num_groups
        self._refs = [0] * num_pages
        self._cached: list[dict[PageKey, int]] = [{} for _ in range(num_groups)]  # key -> page, per group
        self._page_key: dict[int, PageKey] = {}  # page -> key, for cached pages
        # LRU first, per group
        self._evictable: list[collections.OrderedDict[int, None]] = [collections.OrderedDict()
                                                                    for _ in range(num_groups)]

    @property
    def num_free(self) -> int:
        """Pages a sequence could get now (never-used plus evictable cached pages), over all groups."""
        return sum(self.free_in(g) for g in range(self.num_groups))

    def free_in(self, group: int) -> int:
        """Pages a sequence of ``group`` could get now."""
        return self._num_free[group] + len(self._evictable[group])

    def group_of(self, page: int) -> int:
        return page // self.group_pages

    def _take(self, group: int, after: int | None) -> int:
        """A free page of ``group``: ``after + 1`` if free, else where the largest free run puts it."""
        lo, hi = group * self.group_pages, (group + 1) * self.group_pages
        if self._num_free[group]:
            if after is not None and lo <= after + 1 < hi and self._is_free[after + 1]:
                page = after + 1
            else:
                page = self._run_start(lo, hi)
            self._is_free[page] = False
            self._num_free[group] -= 1
        else:
            page, _ = self._evictable[group].popitem(last=False)
            del self._cached[group][self._page_key.pop(page)]
        self._refs[page] = 1
        return page

    def _run_start(self, lo: int, hi: int) -> int:
        """Where a sequence's first free page goes in ``[lo, hi)``: the first of the largest run of free
        pages, or its middle when a page in use precedes the run (that page's sequence grows into the first
        half).  Numpy over the group's pages: about 6 us at 4,096 pages, 0.15-0.5 ms at 512k (8k to 130k
        free runs), once per sequence (and when the page after a sequence's last one is taken)."""
        free = np.concatenate(([False], self._is_free[lo:hi], [False]))
        edges = np.flatnonzero(free[1:] != free[:-1])  # run starts and ends, alternately (relative to lo)
        starts, ends = edges[0::2], edges[1::2]
        i = int(np.argmax(ends - starts))  # the first of the largest
        start, length = int(starts[i]), int(ends[i] - starts[i])
        return lo + (start if start == 0 else start + length // 2)

    def grow(self, page_ids: list[int], num_tokens: int, group: int = 0) -> bool:
        """Append pages (of ``group``) to ``page_ids`` until they hold ``num_tokens``; False (and no change)
        if short."""
        extra = pages_needed(num_tokens, self.page_size) - len(page_ids)
        if extra > self.free_in(group):
            return False
        for _ in range(extra):
            page_ids.append(self._take(group, page_ids[-1] if page_ids else None))
        return True

    def release(self, page_ids: list[int]) -> None:
        """Drop one reference to each page; unused pages become free (or evictable, if cached)."""
        for page in reversed(page_ids):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                g = page // self.group_pages
                if page in self._page_key:
                    self._evictable[g][page] = None
                else:
                    self._is_free[page] = True
                    self._num_free[g] += 1
        page_ids.clear()

    # -- prefix caching ---------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], group: int = 0) -> tuple[list[int], list[PageKey]]:
        """The longest run of cached full pages (of ``group``) that starts ``token_ids`` (at least one
        token is left to compute, so the model still produces logits).  Takes a reference on each page."""
        if not self.enable_prefix_caching:
            return [], []
        ps = self.page_size
        pages: list[int] = []
        keys: list[PageKey] = []
        parent = None
        cached = self._cached[group]
        for i in range((len(token_ids) - 1) // ps):
            key = (parent, tuple(token_ids[i * ps:(i + 1) * ps]))
            page = cached.get(key)
            if page is None:
                break
            pages.append(page)
            keys.append(key)
            parent = hash(key)
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[group][page]
            self._refs[page] += 1
        return pages, keys

    def register_full_pages(self, page_ids: list[int], page_keys: list[PageKey], token_ids, num_computed: int) -> None:
        """Cache the pages of a sequence that became full (all their tokens computed)."""
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        full = min(num_computed // ps, len(page_ids))
        while len(page_keys) < full:
            i = len(page_keys)
            parent = hash(page_keys[-1]) if page_keys else None
            key = (parent, tuple(token_ids(i * ps, (i + 1) * ps)))
            page_keys.append(key)
            page = page_ids[i]
            cached = self._cached[page // self.group_pages]
            if key not in cached and page not in self._page_key:
                cached[key] = page
                self._page_key[page] = key


# -- the device layout ----------------------------------------------------------------------------

KV_HEAD_AXIS = 1  # the axis that tensor parallelism splits (of the cache and of its int8 scales)
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def kv_dtype(kv_cache_dtype: str, model_dtype: Any) -> np.dtype:
    """The cache's value dtype for ``EngineConfig.kv_cache_dtype``: ``auto`` is the model's dtype."""
    if kv_cache_dtype == "auto":
        return np.dtype(model_dtype)
    if kv_cache_dtype == "int8":
        return np.dtype(np.int8)
    if kv_cache_dtype == "fp8_e4m3":
        return np.dtype(jnp.float8_e4m3fn)
    raise ValueError(f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")


def has_scales(dtype: Any) -> bool:
    """Whether a cache of ``dtype`` carries per-token scales (int8: the ``(kv, scales)`` pair)."""
    return np.dtype(dtype) == np.int8


def kv_cache_shape(num_layers: int, num_kv_heads: int, num_pages: int, page_size: int,
                   head_dim: int) -> tuple[int, int, int, int, int]:
    return (num_layers, num_kv_heads, num_pages, page_size, 2 * head_dim)


def cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int, int]:
    """Shape of the engine's cache for ``cfg`` (the model as it runs, KV heads replicated if so)."""
    return kv_cache_shape(cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)


def scale_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int, int]:
    """Shape of the int8 cache's scales: the cache's, with (K scale, V scale) in place of the lanes."""
    return cache_shape(cfg, num_pages, page_size)[:-1] + (2,)


PAGE_AXIS = 2  # the axis that data-parallel attention splits (each data group its own pages)


def partition_spec(model_axis: str | None, cache: Any = None, data_axis: str | None = None) -> Any:
    """How the cache is split on a mesh: KV heads on ``model_axis``, and with data-parallel attention the
    pages on ``data_axis`` (data group ``g`` holds pages ``[g * P / D, (g + 1) * P / D)``, the pages
    ``PageAllocator(num_groups=D)`` gives its sequences), everything else whole.  With a ``cache``
    (arrays or ``ShapeDtypeStruct``s): a spec for each of its leaves (the int8 pair)."""
    def spec(ndim):
        axes = [None] * ndim
        axes[KV_HEAD_AXIS] = model_axis
        axes[PAGE_AXIS] = data_axis
        return P(*axes)
    if cache is None:
        return spec(5)
    return jax.tree_util.tree_map(lambda x: spec(len(x.shape)), cache)


def page_bytes(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
    """Bytes one page takes over all layers and KV heads, K and V (and their scales, for int8)."""
    n = int(np.prod(cache_shape(cfg, 1, page_size))) * np.dtype(dtype).itemsize
    if has_scales(dtype):
        n += int(np.prod(scale_shape(cfg, 1, page_size))) * 4
    return n


def storage_dtype(dtype: Any, platform: str) -> np.dtype:
    """The dtype the cache is stored in: ``dtype``, except 16-bit and 8-bit floats on CPU, kept as their
    uint16 / uint8 bits."""
    dtype = np.dtype(dtype)
    if platform == "cpu" and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return np.dtype(np.uint16) if dtype.itemsize == 2 else np.dtype(np.uint8)
    return dtype


def cache_structs(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any, platform: str,
                  sharding_for: Any = None) -> Any:
    """The cache as ``ShapeDtypeStruct``s in their storage dtypes: one, or the int8 ``(kv, scales)``
    pair.  ``sharding_for(spec_leaf_ndim)``: optional, the sharding of a leaf of that rank."""
    def struct(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding_for(len(shape)) if sharding_for else None)
    kv = struct(cache_shape(cfg, num_pages, page_size), storage_dtype(dtype, platform))
    if has_scales(dtype):
        return kv, struct(scale_shape(cfg, num_pages, page_size), np.float32)
    return kv


def allocate_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any, sharding: Any = None,
                      platform: str | None = None):
    """The zeroed cache (in ``storage_dtype``; the int8 ``(kv, scales)`` pair), created directly in
    ``sharding`` when one is given (a function of a leaf's rank, or one sharding for all; no host copy)."""
    structs = cache_structs(cfg, num_pages, page_size, dtype, platform or jax.default_backend())
    out = None
    if sharding is not None:
        out = jax.tree_util.tree_map(lambda s: sharding(len(s.shape)) if callable(sharding) else sharding, structs)
    return jax.jit(lambda: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structs),
                   out_shardings=out)()


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of ``x [..., D]`` with one scale per row (``absmax / 127``): (int8, float32 scale)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = amax / INT8_MAX
    inv = jnp.where(amax > 0, INT8_MAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    q = jnp.clip(jnp.round(x * inv[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def encode_rows(k: jax.Array, v: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array | None]:
    """New tokens' K/V (``[T, Hkv, D]`` each) as cache rows ``[T, Hkv, 2D]`` of value dtype ``dtype``,
    and their scales ``[T, Hkv, 2]`` (int8) or None."""
    dtype = np.dtype(dtype)
    if has_scales(dtype):
        (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)
        return jnp.concatenate([qk, qv], axis=-1), jnp.stack([sk, sv], axis=-1)
    rows = jnp.concatenate([k, v], axis=-1)
    if dtype == np.dtype(jnp.float8_e4m3fn):  # saturate: a cast past the format's range gives NaN
        rows = jnp.clip(rows.astype(jnp.float32), -FP8_MAX, FP8_MAX)
    return rows.astype(dtype), None


def write_kv(cache: Any, layer: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             dtype: Any = None) -> Any:
    """Write the new tokens' K/V (``[T, Hkv, D]`` each) of ``layer`` at their flat slots
    (``page * page_size + slot``); slots past the end of the cache (padding rows) are dropped.
    ``dtype``: the cache's value dtype when its storage does not say it (an 8-bit float stored as uint8
    bits on CPU); int8 caches (the ``(kv, scales)`` pair) are quantized here, on write.

    One scatter of ``[T, Hkv, 2D]`` rows into the cache, in place when the cache is donated (or a
    loop carry)."""
    kv, scales = split_cache(cache)
    page_size, num_heads = kv.shape[3], kv.shape[1]
    if dtype is None:
        dtype = {np.dtype(np.uint16): k.dtype, np.dtype(np.uint8): jnp.float8_e4m3fn}.get(np.dtype(kv.dtype),
                                                                                          kv.dtype)
    rows, row_scales = encode_rows(k, v, dtype)
    if rows.dtype != kv.dtype:  # an 8/16-bit float cache stored as bits (CPU)
        rows = jax.lax.bitcast_convert_type(rows, kv.dtype)
    page, slot = slot_mapping // page_size, slot_mapping % page_size
    heads = jnp.arange(num_heads)
    # One index per (token, head), so that the scatter's window is the minor (lane) dimension alone: a
    # window over (head, lanes) makes XLA TPU re-lay the whole cache out around the scatter (two copies
    # of the cache per step, seen in `jaxserve plan`'s temporary bytes).
    index = (layer, heads[None, :], page[:, None], slot[:, None])
    kv = kv.at[index].set(rows, mode="drop")
    if scales is None:
        return kv
    return kv, scales.at[index].set(row_scales, mode="drop")


# -- sizing the cache to the device's memory -------------------------------------------------------

DEFAULT_MEMORY_UTILIZATION = 0.9  # on GPU/TPU, when neither num_pages nor kv_cache_bytes is given


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of (sharded) arrays or ``ShapeDtypeStruct``s with shardings
    (without a sharding: the whole leaf)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        s = getattr(leaf, "sharding", None)
        shape = s.shard_shape(leaf.shape) if s is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def device_page_bytes(cfg: ModelConfig, page_size: int, dtype: Any, model_axis: int = 1) -> int:
    """Bytes one page takes on one device: the cache's KV heads are split over the 'model' axis
    (``cfg``: the model as it runs, KV heads replicated to a multiple of ``model_axis``)."""
    return page_bytes(cfg, page_size, dtype) // model_axis


def kv_pages_for_memory(*, bytes_limit: int, memory_utilization: float, weight_bytes: int, temp_bytes: int,
                        page_bytes_per_device: int, data_groups: int = 1) -> int:
    """KV-cache pages that fit in ``memory_utilization`` of one device's ``bytes_limit`` after the
    weights and the largest step's temporaries; every argument is per device (with a mesh, the
    sums are per device: each holds its shard of the weights and of every page of its data group).
    With ``data_groups`` (data-parallel attention) each device holds one group's pages: the cache has
    ``data_groups`` times the pages one device fits."""
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization: must be in (0, 1], got {memory_utilization!r}")
    free = bytes_limit * memory_utilization - weight_bytes - temp_bytes
    return max(0, int(free // page_bytes_per_device)) * data_groups
