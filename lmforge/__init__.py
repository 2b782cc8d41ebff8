"""lmforge: train language models end to end on the hardware you have.

Importing the package is cheap: heavy modules (torch, tokenizers, matplotlib) load on first use.
"""

__version__ = "0.1.0"

from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError  # noqa: E402

__all__ = ["__version__", "LmforgeError", "ConfigError", "DataError", "CheckpointError"]
