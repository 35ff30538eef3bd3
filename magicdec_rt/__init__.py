"""magicdec-rt: MagicDec sparse-KV self-speculative decoding over static-shape steps."""

__version__ = "0.1.0"

from .errors import EngineError, MagicDecError, RequestError  # noqa: E402
from .runtime import GenerationResult, Runtime, StreamEvent  # noqa: E402
from .service import Busy, Service  # noqa: E402

__all__ = ["Runtime", "Service", "Busy", "GenerationResult", "StreamEvent", "MagicDecError", "RequestError",
           "EngineError"]
