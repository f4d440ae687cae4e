"""`fastsae.cli` with every model forward counted, for tests that run it under torchrun: each rank writes
{"setup": n, "fill": n, "after": n} (forward passes before, while and after it fills the activation cache)
to $FORWARD_COUNTS/rank<RANK>.json after each pass (the run ends with os._exit, so not at exit)."""

import json
import os
import sys
from pathlib import Path

from fastsae.cli import main
from fastsae.training.transformer import TransformerActivations

counts = {"setup": 0, "fill": 0, "after": 0}
phase = ["setup"]
target = Path(os.environ["FORWARD_COUNTS"]) / f"rank{os.environ.get('RANK', '0')}.json"
run_windows, cache_chunks = TransformerActivations._run_windows, TransformerActivations.cache_chunks


def _write() -> None:
    target.write_text(json.dumps(counts))


def counted_run_windows(self, *args, **kwargs):
    counts[phase[0]] += 1
    _write()
    return run_windows(self, *args, **kwargs)


def counted_cache_chunks(self, indices):
    phase[0] = "fill"
    try:
        return cache_chunks(self, indices)
    finally:
        phase[0] = "after"


TransformerActivations._run_windows = counted_run_windows
TransformerActivations.cache_chunks = counted_cache_chunks
_write()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
