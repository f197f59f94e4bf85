from .naive import naive_window_attention

__all__ = ["naive_window_attention"]
