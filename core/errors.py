"""Exception types. Each names the field or file at fault and what to do."""


class D3POError(Exception):
    """Base class of every error D3PO Studio raises on purpose."""


class ConfigError(D3POError, ValueError):
    """A setting or argument is out of range or unknown."""


class ModelLoadError(D3POError):
    """A model could not be loaded: missing, corrupt, unrecognised or unsafe file."""


class SessionError(D3POError):
    """A session folder or a session call is invalid (bad batch, nothing to undo, ...)."""


class UpdateError(D3POError):
    """An update was rolled back (NaN/inf loss or gradient, out of memory)."""


class Cancelled(SessionError):
    """A queued or running update was cancelled (``close(cancel=True)``); nothing was trained."""
