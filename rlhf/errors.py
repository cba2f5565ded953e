"""Errors shared across the package, in a module that imports nothing of it: config.py and ops.py both need
ConfigError, and ops.py must not import config.py (config -> losses -> ops would come back to config)."""


class ConfigError(ValueError):
    """A configuration problem, reported as one line: where, what was given, what was expected."""
