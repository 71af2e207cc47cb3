"""Builds the compiled parts of jaxserve, three CPU kernels, each an XLA FFI handler (the FFI headers are
vendored in ``csrc/xla/``, so the build needs only setuptools and a C++17 compiler):
``kernels_pallas._attention_cpu`` (``csrc/attention_cpu/``), ``kernels_pallas._gemm_cpu`` (the layers'
float32 matmul, ``csrc/gemm_cpu/``) and ``kernels_pallas._layer_cpu`` (a whole decoder layer in one call
from the two kernels' code, ``csrc/layer_cpu/``).  Everything else is in pyproject.toml.

The extensions are optional: if one does not compile, the install still succeeds (with a warning) and
the engine serves without it: the pure-JAX reference attention (kernels_pallas/ragged_paged_attention_cpu.py),
XLA's dot (kernels_pallas/gemm_cpu.py), the layer op by op (kernels_pallas/layer_cpu.py).
No ``-mavx2``: the AVX2/FMA (and AVX-512) code is compiled for that target inside the source (target
pragmas and attributes) and chosen at run time by what the CPU has, so one build runs on any x86-64 CPU.
"""

from __future__ import annotations

import logging

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext with per-compiler flags, where a failed compile is a warning, not an error."""

    def build_extension(self, ext):
        if self.compiler.compiler_type == "msvc":
            ext.extra_compile_args = ["/std:c++17", "/O2", "/Icsrc"]
        else:
            ext.extra_compile_args = ["-std=c++17", "-O3", "-fvisibility=hidden", "-isystem", "csrc"]
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any compiler failure: install without the kernel
            logging.getLogger("setup").warning(
                "jaxserve: the CPU kernel %s was not built (%s); on CPU %s serves instead", ext.name, e,
                {"kernels_pallas._attention_cpu": "the reference attention",
                 "kernels_pallas._gemm_cpu": "XLA's dot"}.get(ext.name, "the per-op layer"))


setup(
    ext_modules=[Extension("kernels_pallas._attention_cpu", sources=["csrc/attention_cpu/attention_cpu.cc"],
                           depends=["csrc/attention_cpu/kernel.h", "csrc/attention_cpu/vec_avx2.h",
                                    "csrc/attention_cpu/decode_avx512.h",
                                    "csrc/attention_cpu/prefill_avx512.h",
                                    "csrc/attention_cpu/vec_portable.h", "csrc/cpu_pool.h", "csrc/ffi_module.h"],
                           language="c++", optional=True),  # optional: a failed build is not copied
                 Extension("kernels_pallas._gemm_cpu", sources=["csrc/gemm_cpu/gemm_cpu.cc"],
                           depends=["csrc/cpu_pool.h", "csrc/ffi_module.h"], language="c++", optional=True),
                 # a whole decoder layer in one call: includes the two kernels' sources
                 Extension("kernels_pallas._layer_cpu", sources=["csrc/layer_cpu/layer_cpu.cc"],
                           depends=["csrc/gemm_cpu/gemm_cpu.cc", "csrc/attention_cpu/attention_cpu.cc",
                                    "csrc/attention_cpu/kernel.h", "csrc/attention_cpu/vec_avx2.h",
                                    "csrc/attention_cpu/decode_avx512.h", "csrc/attention_cpu/prefill_avx512.h",
                                    "csrc/attention_cpu/vec_portable.h", "csrc/cpu_pool.h", "csrc/ffi_module.h"],
                           language="c++", optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
