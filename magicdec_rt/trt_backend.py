"""The TensorRT backend, through torch-tensorrt's dynamo path. NOT YET RUN ON A GPU: this machine
has no CUDA device and TensorRT's libraries cannot be installed here, so nothing below has ever
executed; it is kept thin and imported only when an engine names this backend.

Install with ``pip install 'magicdec-rt[tensorrt]'`` (torch-tensorrt pins one torch minor: 2.14.x
needs torch 2.14.* and tensorrt-cu13 11.1.*).

The graph compiled is the same ExportedProgram the other backends use: the KV caches stay outside
the engine as inputs (torch-tensorrt's in-place KV aliasing cannot write per-row positions), the
attention masks are built by the model from ``lengths`` and the causal block (no reliance on an
SDPA converter's masking), and every input is passed contiguous (``engine.graph_inputs``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import EngineError

INSTALL = "pip install 'magicdec-rt[tensorrt]'"


def require():
    try:
        import torch_tensorrt
    except ImportError as e:
        raise EngineError(f"backend 'tensorrt' needs torch-tensorrt, which is not installed ({e}); {INSTALL}") from None
    return torch_tensorrt


def versions() -> dict:
    trt = require()
    import tensorrt

    return {"torch_tensorrt": trt.__version__, "tensorrt": tensorrt.__version__}


def check_versions(where: str, built: dict) -> None:
    have = versions()
    for name in ("torch_tensorrt", "tensorrt"):
        if built.get(name) != have[name]:
            raise EngineError(
                f"{where} was built with {name} {built.get(name)} and this is {name} {have[name]}: TensorRT "
                f"engines only load in the version that built them; install {name}=={built.get(name)} or rebuild"
            )


def compile_exported(ep: torch.export.ExportedProgram, inputs: tuple, dtype: torch.dtype, path: Path) -> None:
    trt = require()
    flat = [t for x in inputs for t in (x if isinstance(x, (list, tuple)) else [x])]
    module = trt.dynamo.compile(
        ep,
        arg_inputs=list(inputs),
        enabled_precisions={dtype},
        use_explicit_typing=False,
        min_block_size=1,
        require_full_compilation=True,
    )
    trt.save(module, str(path), output_format="exported_program", arg_inputs=flat)


def load(path: Path):
    require()
    return torch.export.load(str(path)).module()
