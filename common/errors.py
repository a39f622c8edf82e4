"""Errors that speak to the user: what went wrong, where, and what to do."""


class SVPError(Exception):
    """Base class for user-facing errors; the `svp` CLI prints them and exits non-zero."""


class DataError(SVPError):
    """Bad or missing input data (files, folders, splits, annotations)."""


class ConfigError(SVPError):
    """An unknown config key, a wrong type, or an invalid value."""


class SweepIncomplete(SVPError):
    """A sweep ended with no completed trial, or with trials left unfinished."""
