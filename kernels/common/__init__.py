from .params import NSAParams

__all__ = ["NSAParams"]
