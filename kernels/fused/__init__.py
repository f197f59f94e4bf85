from .args import SplitWorkspace, VerifyArgs
from .decode import decode_geometry, fused_decode
from .geometry import build_geometry, copy_geometry_
from .naive import naive_fused_query, naive_fused_tree
from .verify import VerifyGeometry, nsa_verify_fwd, split_workspace

__all__ = ["SplitWorkspace", "VerifyArgs", "VerifyGeometry", "build_geometry", "copy_geometry_", "decode_geometry",
           "fused_decode", "naive_fused_query", "naive_fused_tree", "nsa_verify_fwd",
           "split_workspace"]
