"""fastsae's Triton kernels, installed as `fastsae.kernels` (never as a top-level `kernels`
module: a different PyPI package owns that name).

One module per op: the @triton.jit kernels and their plain launchers. The ops layer
(`fastsae.ops.dispatch`) registers them as the `triton` backend.
"""
