from .naive import naive_stage_rows
from .rows import stage_rows

__all__ = ["naive_stage_rows", "stage_rows"]
