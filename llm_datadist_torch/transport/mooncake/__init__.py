"""The cross-host transport on the Mooncake Transfer Engine (optional dependency) and the
per-engine agent that owns Mooncake's engine and registrations."""
from .transport import MooncakeTransport, coalesce

__all__ = ["MooncakeTransport", "coalesce"]
