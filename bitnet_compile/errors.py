"""Re-export of the shared user-error type, so compiler modules need not know it lives in the runtime."""

from bitnet_runtime.errors import UserError

__all__ = ["UserError"]
