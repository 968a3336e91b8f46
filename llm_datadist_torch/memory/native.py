"""The C++ extension `llm_datadist_torch._C` (built from csrc/ by setup.py), imported here only:
every other module takes it from this one, so the layer contract sees who depends on it."""
from .. import _C

__all__ = ["_C"]
