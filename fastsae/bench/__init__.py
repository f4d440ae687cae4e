"""fastsae's benchmark harness (`fastsae bench`): public API against pure-torch baselines."""

from fastsae.bench.runner import OPS, Shape, format_table, run_bench, write_json

__all__ = ["OPS", "Shape", "format_table", "run_bench", "write_json"]
