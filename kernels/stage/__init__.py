from .naive import naive_stage_rows
from .rows import stage_rows
from .step_metadata import fill_step_metadata

__all__ = ["fill_step_metadata", "naive_stage_rows", "stage_rows"]
