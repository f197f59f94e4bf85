"""SpecSA: speculative decoding with Native Sparse Attention (NSA).

Subpackages (dependencies point one way): `specsa.kernels` (torch/triton ops) <-
`specsa.model` (NSA decoder, paged caches, loader) <- `specsa.runtime` (generation, sampling,
speculative loop) <- `specsa.sglang_plugin`. Importing `specsa` itself is cheap: nothing
heavy is imported here.
"""
__version__ = "0.1.0"
