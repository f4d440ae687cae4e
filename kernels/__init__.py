"""fastsae's Triton kernels, installed as `fastsae.kernels` (never as a top-level `kernels`
module: a different PyPI package owns that name).

One module per op: the @triton.jit kernels and their launchers, registered as
`fastsae_triton::*` ops. `fastsae.ops.backend_triton` makes them the `triton` backend.
"""
