"""jaxserve: an LLM inference engine on JAX (continuous batching over a paged KV cache)."""

from jaxserve import cpu_malloc

cpu_malloc.tune()  # before JAX's CPU client starts its threads (jaxserve/cpu_malloc.py)

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import Engine
from jaxserve.sampling import SamplingParams
from jaxserve.sequence import Logprob, RequestOutput

__all__ = ["Engine", "EngineConfig", "ModelConfig", "SamplingParams", "RequestOutput", "Logprob"]
__version__ = "0.1.0"
