"""Where a trained SAE's activations came from, in the `cfg.json` `metadata` keys SAELens writes
(`model_name`, `hook_name`, a transcoder's `hook_name_out`, `context_size`, `dataset_path`), so a saved
SAE says what it encodes."""

from __future__ import annotations


def provenance_metadata(data: dict) -> dict:
    """SAELens metadata from a data source's `describe()` dict ({} for an unknown kind)."""
    kind = data.get("kind")
    if kind == "transformer":
        recorded = {
            "model_name": data.get("model"),
            "hook_name": data.get("hook"),
            "context_size": data.get("seq_len"),
            "dataset_path": data.get("text"),
        }
        if data.get("hook_out") is not None:  # a transcoder's target, under SAELens' key
            recorded["hook_name_out"] = data["hook_out"]
        return recorded
    if kind == "files":
        return {"dataset_path": data.get("path")}
    if kind == "synthetic":
        return {"dataset_path": "synthetic"}
    return {}
