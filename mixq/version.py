"""mixq's version (recorded in every file mixq writes)."""

__version__ = "0.1.0"
