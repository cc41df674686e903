"""Errors that several layers raise and the command line reports in one line (``skipkernels.cli``)."""


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this model or configuration."""


class MissingDependency(ImportError, ValueError):
    """An optional package a setting needs is not installed (the message says which and how)."""
