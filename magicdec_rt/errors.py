"""The errors a caller can act on. Each message names the bad value and what is allowed."""


class MagicDecError(ValueError):
    """Base class: the request or the engine was rejected before any state changed."""


class RequestError(MagicDecError):
    """A generation request is invalid (prompt, sampling parameters, gamma, lengths)."""


class EngineError(MagicDecError):
    """An engine directory or model source is missing, corrupted or incompatible."""
