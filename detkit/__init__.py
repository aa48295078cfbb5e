"""detkit: a config-driven object-detector training framework."""

__version__ = "0.1.0"
