"""The paged KV cache: a free-page allocator on the host and the one device array that holds K and V.

Host side: ``PageAllocator`` hands out page ids; each sequence keeps its list of
pages (its page table), and the position ``p`` of a sequence lives in slot
``p % page_size`` of page ``page_ids[p // page_size]``.

Device side (this module is the one place that owns the layout; the model, the
reference attention, both Pallas kernels, the sharding specs and the memory
planner all read it from here)::

    kv_cache: [num_layers, num_kv_heads, num_pages, page_size, 2 * head_dim]
               ^ scanned   ^ split on     ^ the page table   ^ K in lanes [:D],
                 by the      the 'model'    indexes this       V in lanes [D:]
                 layer loop  mesh axis

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
from kernels_pallas.ragged_paged_attention import as_values  # noqa: F401  (the reader of the storage dtype)

logger = logging.getLogger(__name__)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


PageKey = tuple  # (hash of the previous page's key or None, the page's token ids)


class PageAllocator:
    """Hands out page ids, counts references, and (optionally) caches full pages by content.

    Without prefix caching it is a stack of free pages: sequences grow page by
    page and give them all back when done.  With prefix caching every *full*
    page is also registered under a key made of its tokens and the key of the
    page before it (a hash chain, so equal keys mean equal prefixes); a new
    sequence whose prompt starts with cached pages shares them (reference
    counts) instead of recomputing them.  A cached page nobody uses is
    *evictable*: it still counts as free, and allocation takes the least
    recently used one only when no never-cached page is left.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False):
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_pages
        self._cached: dict[PageKey, int] = {}  # key -> page
        self._page_key: dict[int, PageKey] = {}  # page -> key, for cached pages
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

    @property
    def num_free(self) -> int:
        """Pages a sequence could get now (never-used plus evictable cached pages)."""
        return len(self._free) + len(self._evictable)

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._cached[self._page_key.pop(page)]
        self._refs[page] = 1
        return page

    def grow(self, page_ids: list[int], num_tokens: int) -> bool:
        """Append pages to ``page_ids`` until they hold ``num_tokens``; False (and no change) if short."""
        extra = pages_needed(num_tokens, self.page_size) - len(page_ids)
        if extra > self.num_free:
            return False
        for _ in range(extra):
            page_ids.append(self._take())
        return True

    def release(self, page_ids: list[int]) -> None:
        """Drop one reference to each page; unused pages become free (or evictable, if cached)."""
        for page in reversed(page_ids):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._page_key:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        page_ids.clear()

    # -- prefix caching ---------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[PageKey]]:
        """The longest run of cached full pages that starts ``token_ids`` (at least one token is left
        to compute, so the model still produces logits).  Takes a reference on each page."""
        if not self.enable_prefix_caching:
            return [], []
        ps = self.page_size
        pages: list[int] = []
        keys: list[PageKey] = []
        parent = None
        for i in range((len(token_ids) - 1) // ps):
            key = (parent, tuple(token_ids[i * ps:(i + 1) * ps]))
            page = self._cached.get(key)
            if page is None:
                break
            pages.append(page)
            keys.append(key)
            parent = hash(key)
        for page in pages:
            if self._refs[page] == 0:
                del self._evictable[page]
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
            if key not in self._cached and page not in self._page_key:
                self._cached[key] = page
                self._page_key[page] = key


# -- the device layout ----------------------------------------------------------------------------

KV_HEAD_AXIS = 1  # the axis that tensor parallelism splits


def kv_cache_shape(num_layers: int, num_kv_heads: int, num_pages: int, page_size: int,
                   head_dim: int) -> tuple[int, int, int, int, int]:
    return (num_layers, num_kv_heads, num_pages, page_size, 2 * head_dim)


def cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int, int]:
    """Shape of the engine's cache for ``cfg`` (the model as it runs, KV heads replicated if so)."""
    return kv_cache_shape(cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)


def partition_spec(model_axis: str | None) -> P:
    """How the cache is split on a mesh: KV heads on ``model_axis``, everything else whole."""
    spec = [None] * 5
    spec[KV_HEAD_AXIS] = model_axis
    return P(*spec)


def page_bytes(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
    """Bytes one page takes over all layers and KV heads, K and V."""
    return int(np.prod(cache_shape(cfg, 1, page_size))) * np.dtype(dtype).itemsize


def storage_dtype(dtype: Any, platform: str) -> np.dtype:
    """The dtype the cache is stored in: ``dtype``, except 16-bit floats on CPU, kept as uint16 bits."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if platform == "cpu" and dtype.itemsize == 2 else dtype


def allocate_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any, sharding: Any = None,
                      platform: str | None = None):
    """The zeroed cache (in ``storage_dtype``), created directly in ``sharding`` when one is given (no
    host copy)."""
    shape = cache_shape(cfg, num_pages, page_size)
    dtype = storage_dtype(dtype, platform or jax.default_backend())
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def write_kv(cache: jax.Array, layer: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> jax.Array:
    """Write the new tokens' K/V (``[T, Hkv, D]`` each) of ``layer`` at their flat slots
    (``page * page_size + slot``); slots past the end of the cache (padding rows) are dropped.

    One scatter of ``[T, Hkv, 2D]`` rows into the cache, in place when the cache is donated (or a
    loop carry)."""
    page_size, num_heads = cache.shape[3], cache.shape[1]
    rows = jnp.concatenate([k, v], axis=-1)  # [T, Hkv, 2D]
    if cache.dtype == jnp.uint16 and rows.dtype != jnp.uint16:  # a 16-bit cache stored as bits (CPU)
        rows = jax.lax.bitcast_convert_type(rows, jnp.uint16)
    rows = rows.astype(cache.dtype)
    page, slot = slot_mapping // page_size, slot_mapping % page_size
    heads = jnp.arange(num_heads)
    # One index per (token, head), so that the scatter's window is the minor (lane) dimension alone: a
    # window over (head, lanes) makes XLA TPU re-lay the whole cache out around the scatter (two copies
    # of the cache per step, seen in `jaxserve plan`'s temporary bytes).
    return cache.at[layer, heads[None, :], page[:, None], slot[:, None]].set(rows, mode="drop")


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
                        page_bytes_per_device: int) -> int:
    """KV-cache pages that fit in ``memory_utilization`` of one device's ``bytes_limit`` after the
    weights and the largest step's temporaries; every argument is per device (with a mesh, the
    sums are per device: each holds its shard of the weights and of every page)."""
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization: must be in (0, 1], got {memory_utilization!r}")
    free = bytes_limit * memory_utilization - weight_bytes - temp_bytes
    return max(0, int(free // page_bytes_per_device))
