from .chunked import chunked_nsa_prefill
from .naive import naive_nsa_prefill_rows

__all__ = ["chunked_nsa_prefill", "naive_nsa_prefill_rows"]
