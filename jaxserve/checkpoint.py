"""Orbax checkpoints of converted weights: ``jaxserve convert`` writes them, ``Engine`` restores them.

A converted checkpoint directory::

    CKPT_DIR/
        jaxserve_checkpoint.json   # marker: format version, dtype, parameter layout
        config.json                # the Hugging Face config, copied
        tokenizer.json, ...        # the tokenizer files, copied (if the model has them)
        params/                    # Orbax (OCDBT) checkpoint of the Flax parameter tree

The parameter tree is the one ``weights.hf_to_params`` builds (fused, transposed,
in the layouts of ``model.py``), already cast to the chosen dtype, so loading
does no conversion work.  It is stored for the model as written (its own KV
head count); replicating KV heads for a wide ``model`` axis happens after the
restore, on the mesh.

Restoring (``restore_params``) hands Orbax a target tree of
``jax.ShapeDtypeStruct`` whose ``sharding`` is the parameter's ``NamedSharding``
(``restore_targets``): every process reads only the slices of the stored
arrays that its devices hold, so no device (and no host) ever materialises a
whole sharded weight.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxserve import quant, sharding
from jaxserve.config import ModelConfig
from jaxserve.weights import NP_DTYPES, load_params

logger = logging.getLogger(__name__)

MARKER = "jaxserve_checkpoint.json"
FORMAT_VERSION = 2  # 2: layer weights stacked under "layers" (the model scans over them)
PARAMS_SUBDIR = "params"
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def is_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory written by ``convert``."""
    return os.path.isfile(os.path.join(path, MARKER))


def read_marker(ckpt_dir: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, MARKER)) as f:
        info = json.load(f)
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"model: {ckpt_dir} has checkpoint format {info.get('format_version')!r}, "
                         f"this jaxserve reads format {FORMAT_VERSION}")
    return info


@contextlib.contextmanager
def elapsed_bar(desc: str, total_bytes: int, enabled: bool) -> Iterator[None]:
    """A tqdm line on stderr for one long call that reports no progress of its own (an Orbax save or
    restore): what it moves and the seconds elapsed, refreshed twice a second until the call returns."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    done = threading.Event()
    with tqdm(total=None, desc=f"{desc} ({total_bytes / 2**20:,.0f} MiB)", bar_format="{desc}: {elapsed}",
              leave=False) as bar:
        def tick():
            while not done.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def convert(hf_dir: str, out_dir: str, dtype: str = "bfloat16", progress: bool = False,
            revision: str | None = None, quantization: str | None = None) -> str:
    """Convert a Hugging Face checkpoint (a directory, or a Hub id at ``revision``) into an Orbax
    checkpoint at ``out_dir`` (``progress``: tqdm bars over the layers read and while Orbax writes).
    ``quantization="int8"``: the linear layers and the embedding are stored as int8 with float32
    per-output-channel scales (``jaxserve/quant.py``), the rest in ``dtype``."""
    import orbax.checkpoint as ocp

    from jaxserve.hub import resolve_model

    if dtype not in NP_DTYPES:
        raise ValueError(f"dtype: must be one of {', '.join(NP_DTYPES)}, got {dtype!r}")
    if quantization is not None and quantization not in ("int8", "w8a8"):
        raise ValueError(f"quantization: must be None, int8 or w8a8 (a Hugging Face checkpoint is quantized per "
                         f"channel), got {quantization!r}")
    out_dir = os.path.abspath(out_dir)
    params_dir = os.path.join(out_dir, PARAMS_SUBDIR)
    if os.path.exists(params_dir):
        raise ValueError(f"out: {params_dir} already exists (choose a new directory)")
    hf_dir = resolve_model(hf_dir, revision, progress=progress)
    cfg = ModelConfig.from_dir(hf_dir)
    params = load_params(hf_dir, cfg, NP_DTYPES[dtype], progress, quantization)
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    with elapsed_bar("write (Orbax)", _tree_bytes(params), progress):
        checkpointer.save(params_dir, params)
        checkpointer.wait_until_finished()
    copied = []
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(src, os.path.join(out_dir, name))
            copied.append(name)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "dtype": dtype, "quantization": quantization,
                   "source": os.path.abspath(hf_dir),
                   "layout": {"qkv_proj": "[L, H, Hkv, G+2, D]", "gate_up_proj": "[L, H, 2, I]"}}, f, indent=2)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    logger.info("converted %s (%.1fM parameters, %s) to %s; copied %s", hf_dir, n / 1e6, dtype, out_dir,
                ", ".join(copied))
    return out_dir


def stored_shapes(ckpt_dir: str) -> dict[str, Any]:
    """The stored parameter tree as (shape, dtype) leaves, from the Orbax metadata (no data read)."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(os.path.join(os.path.abspath(ckpt_dir), PARAMS_SUBDIR))
    tree = meta.item_metadata.tree
    return jax.tree_util.tree_map(lambda m: (tuple(m.shape), np.dtype(m.dtype)), tree,
                                  is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def _restore_specs(cfg: ModelConfig, mesh: Mesh, quantized: bool = False) -> dict[str, Any]:
    """Shardings to restore the stored (unreplicated) tree into.  With KV-head replication the stored
    ``qkv_proj`` cannot be split on its KV heads, so it is restored split on its input (hidden)
    axis and re-laid out on the mesh afterwards."""
    m = mesh.shape[sharding.MODEL]
    replication = sharding.kv_replication(cfg, m)
    specs = sharding.param_specs(cfg, m)
    if quantized:
        specs = quant.param_specs(specs)
    if replication > 1:
        hidden_split = sharding.MODEL if cfg.hidden_size % m == 0 else None
        qkv = specs["layers"]["qkv_proj"]
        qkv["kernel"] = P(None, hidden_split, None, None, None)
        for name in ("bias", "scale"):
            if name in qkv:
                qkv[name] = P()
    return specs


def restore_targets(ckpt_dir: str, cfg: ModelConfig, dtype: Any, mesh: Mesh | None) -> dict[str, Any]:
    """The Orbax restore target: a ``jax.ShapeDtypeStruct`` per parameter carrying the sharding it is
    restored into (``NamedSharding`` on ``mesh``; the default device without one)."""
    shapes = stored_shapes(ckpt_dir)
    # int8 weights and their scales keep their stored dtypes (jaxserve/quant.py); the rest is cast to dtype
    dtypes = quant.stored_dtypes(shapes, dtype)
    is_shape = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], np.dtype)  # noqa: E731
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return jax.tree_util.tree_map(lambda sd, dt: jax.ShapeDtypeStruct(sd[0], dt, sharding=device), shapes,
                                      dtypes, is_leaf=is_shape)
    quantized = any(dt == np.int8 for dt in jax.tree_util.tree_leaves(dtypes))
    specs = _restore_specs(cfg, mesh, quantized)
    return jax.tree_util.tree_map(
        lambda spec, sd, dt: jax.ShapeDtypeStruct(sd[0], dt, sharding=NamedSharding(mesh, spec)),
        specs, shapes, dtypes, is_leaf=lambda x: isinstance(x, P))


def restore_params(ckpt_dir: str, cfg: ModelConfig, dtype: Any, mesh: Mesh | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """Restore the parameters of a converted checkpoint onto the device(s), in the sharding the
    engine runs them with (``sharding.param_specs`` of the model as it runs on ``mesh``).
    ``progress``: a line on stderr with the size and the seconds elapsed while Orbax restores."""
    import orbax.checkpoint as ocp

    read_marker(ckpt_dir)
    targets = restore_targets(ckpt_dir, cfg, dtype, mesh)
    with elapsed_bar("restore (Orbax)", _tree_bytes(targets), progress):
        params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(ckpt_dir), PARAMS_SUBDIR),
                                                    targets)
    if mesh is not None:
        replication = sharding.kv_replication(cfg, mesh.shape[sharding.MODEL])
        if replication > 1:
            run_cfg = sharding.sharded_model_config(cfg, mesh.shape[sharding.MODEL])
            relayout = jax.jit(lambda p: sharding.replicate_kv_heads(p, cfg, replication),
                               out_shardings=sharding.param_shardings(mesh, run_cfg, quant.is_quantized(params)))
            params = relayout(params)
    return params


__all__ = ["convert", "is_checkpoint", "read_marker", "restore_params", "restore_targets", "stored_shapes",
           "MARKER", "PARAMS_SUBDIR"]
