"""Defaults that the command line shows in its help, in a module that imports nothing (so not torch)."""

DEFAULT_METHODS = ("octav", "sweep", "p99.9", "p99.99", "p99.999", "max")
