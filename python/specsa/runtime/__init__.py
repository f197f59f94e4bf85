"""Standalone runtime: autoregressive NSA generation, sampling, speculative loop.

Import the submodules directly (`specsa.runtime.generate`, `specsa.runtime.sampling`); this
package file imports nothing so that any submodule loads without the others.
"""
