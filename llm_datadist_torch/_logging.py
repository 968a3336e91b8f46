"""Package logger set-up: a NullHandler and an optional level from the environment.

The library installs no output handler (applications decide where logs go). The level comes
from `LLM_DATADIST_TORCH_LOG_LEVEL` (a logging level name), else from upstream's
`ASCEND_GLOBAL_LOG_LEVEL` ("0" debug, "1" info, "2" warning, "3" error).
"""
from __future__ import annotations

import logging
import os

_ASCEND_LEVELS = {"0": logging.DEBUG, "1": logging.INFO, "2": logging.WARNING, "3": logging.ERROR}


def configure_package_logger() -> None:
    logger = logging.getLogger("llm_datadist_torch")
    logger.addHandler(logging.NullHandler())
    name = os.environ.get("LLM_DATADIST_TORCH_LOG_LEVEL", "").strip().upper()
    if name and isinstance(logging.getLevelName(name), int):
        logger.setLevel(logging.getLevelName(name))
    elif os.environ.get("ASCEND_GLOBAL_LOG_LEVEL") in _ASCEND_LEVELS:
        logger.setLevel(_ASCEND_LEVELS[os.environ["ASCEND_GLOBAL_LOG_LEVEL"]])
