"""TEST SUPPORT ONLY: one allocation detail of SGLang 0.5.23's CPU path, for the `sglang` tier.

What it replaces: with `--enable-return-routed-experts` (MoE routing replay) the server keeps
each token's experts in a host buffer that it pins with `cudaHostRegister`
(`sglang/srt/mem_cache/pool_host/common.py: _cuda_host_register`, chosen for every device but
npu/musa/xpu); on `--device cpu` there is no CUDA runtime and the server dies at start-up
("Found no NVIDIA driver"). The buffer is plain host memory either way; registering it only
speeds up GPU copies. Here, with `SGLANG_USE_CPU_ENGINE=1`, the registration is skipped.
Everything else (the capture of each layer's top-k, the base64 answer) is SGLang's own.

Python imports `sitecustomize` at start-up from the first path entry that has one: the tier
(tests/real_sglang) puts `tests/sglang_cpu` on the server's PYTHONPATH; nothing else sees it.
"""

import os

if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    try:
        from sglang.srt.mem_cache.pool_host import common as _pool_host
    except ImportError:  # not the SGLang interpreter (e.g. the trainer with the same PYTHONPATH)
        _pool_host = None
    if _pool_host is not None and hasattr(_pool_host, "_cuda_host_register"):
        _pool_host._cuda_host_register = lambda buffer, granularity=None: None
