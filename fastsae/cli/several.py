"""`fastsae train` with several SAEs (several hooks, hook patterns, lists of --k or --d-sae): one pass
of the data feeds them all (fastsae.training.multi), each SAE in its own run folder under --out,
listed in OUT/sae_runs.json.

Under torchrun, with W processes and n SAEs:
- n >= W: the SAEs are spread over the processes. Rank r trains SAEs r, r + W, r + 2W, ... of the
  plan, whole, as one-process runs (`Trainer(..., local=True)`: no DDP, no collective in a step),
  reading the model at its own hooks only; each run folder is written by the rank that trains it.
  sparsify's `--distribute_modules` differs: each rank runs the model on its slice of the batch and
  the ranks all-gather every hook's activations, so the model's forward is split over the ranks.
  Here, with an activation cache (a folder every rank sees), the forward is split through it: before
  training rank r writes chunks r, r + W, ... of those the run reads, at every SAE's hook, into the
  cache (chunks already there are skipped), the ranks meet, and each trains reading the cache only.
  Without a cache every rank runs the model on all tokens, up to its deepest hook (the known cost).
- n < W: every SAE is trained data parallel over all ranks, as a one-SAE torchrun run; the
  trainers' collectives come in the driver's order, the same on every rank (the cache is filled
  the same way first).
The processes meet only before training (after filling the cache, then after building the trainers:
to agree that every rank could set up) and after it (to gather the figures rank 0 prints and writes). A run's checkpoints are one-process ones, so
`--resume` re-spreads the SAEs over any number of processes (round robin again) and says so.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Optional

from fastsae.cli.flags import data_settings, run_config, setting
from fastsae.cli.one_run import build_run, open_data, report, secs
from fastsae.cli.resume import resume_differences
from fastsae.cli.threads import set_threads

SEVERAL_RUNS = "sae_runs.json"  # in --out of several SAEs: each one's folder, hook, k, d_sae and rank


def trains_several(args) -> bool:
    """Several hooks, a hook pattern, a list of --k or --d-sae, or --resume of such a run."""
    from glob import escape

    hooks = [] if args.hook is None else _values(args.hook)
    return (len(hooks) > 1 or any(hook != escape(hook) for hook in hooks) or isinstance(args.k, list)
            or isinstance(args.d_sae, list) or bool(args.resume and args.out and (Path(args.out) / SEVERAL_RUNS).is_file()))


def first_checkpoint(out) -> Optional[Path]:
    """The newest checkpoint of the first SAE of the several-SAE run in `out` (None if there is none)."""
    from fastsae.runs import latest_checkpoint

    try:
        plan = json.loads((Path(out) / SEVERAL_RUNS).read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return None
    return latest_checkpoint(Path(out) / plan[0]["folder"]) if plan else None


def _values(value) -> list:
    return value if isinstance(value, list) else [value]


def _plan(args, widths: dict) -> list[dict]:
    """One SAE per (hook, k, d_sae) ({hook: d_in}; hook None: --data): its folder under --out,
    OUT/<hook>[/k<k>-d<d_sae>] (the second part only for a sweep: when --k or --d-sae lists several values)."""
    from fastsae import architectures

    arch = architectures.get(setting(args, "architecture"))
    sweep = isinstance(args.k, list) or isinstance(args.d_sae, list)
    plan = []
    for hook, d_in in widths.items():
        for k in _values(setting(args, "k")):
            for d_sae in _values(setting(args, "d_sae", arch, d_in)):
                name = f"k{k}-d{d_sae}"
                folder = name if hook is None else f"{hook}/{name}" if sweep else hook
                plan.append({"folder": folder, "hook": hook, "k": k, "d_sae": d_sae})
    return plan


def _open_source(args, hooks: list, description: Optional[dict] = None):
    """The one source every SAE reads: the --data source, or the model read at `hooks` (names or patterns)."""
    if args.data is not None or (description is not None and description.get("kind") != "transformer"):
        from fastsae.training.data import open_source

        return open_source(description) if description is not None else open_data(args)
    from fastsae.training.transformer import TransformerActivations

    settings = data_settings(args, "transformer")
    settings["cache_dir"] = None if str(args.activation_cache).lower() == "none" else args.activation_cache
    if description is not None:  # --resume: the runs' own data
        settings = {key: description.get(key) for key in ("model", "text", "seq_len", "seqs_per_chunk", "max_tokens", "cache_dir")}
    settings["hook"] = hooks
    print(f"loading {settings['model']} and tokenizing {settings['text']!r} ...", flush=True)
    return TransformerActivations(**settings, device=setting(args, "device"))


def _views(source, hooks: list) -> dict:
    """{hook: data source} for the SAEs at `hooks`: views of one pass of the model at those hooks only,
    or the one --data source (hook None)."""
    if hooks == [None]:
        return {None: source}
    from fastsae.training.multi import hook_views

    if list(source.hooks) != hooks:
        source = source.with_hooks(hooks)  # the forward stops after the deepest of them
    return hook_views(source, buffer_rows=1 << 16)


def _placement(n_saes: int, world: int) -> tuple[str, list]:
    """How the SAEs share the processes, and each SAE's rank ("all": data parallel over every rank)."""
    if world == 1:
        return "one process", [0] * n_saes
    if n_saes >= world:
        return "spread", [index % world for index in range(n_saes)]
    return "data parallel", ["all"] * n_saes


def _gather(value) -> list:
    """Every rank's `value`, in rank order (collective; [value] outside torchrun)."""
    from fastsae import distributed as fdist

    if not fdist.is_distributed():
        return [value]
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _prepare(args, out: Path, device, world: int, rank: int) -> dict:
    """The plan, each SAE's rank, this rank's SAEs and the data source (with every SAE's hooks); under torchrun with
    an activation cache, this rank's share of the chunks the run reads is written into the cache (`_fill_cache`)."""
    from fastsae.runs import latest_checkpoint
    from fastsae.training.config import TrainerConfig

    set_threads(args.threads, device)
    if args.shard_latents and world > 1:
        raise ValueError("--shard-latents: several SAEs under torchrun are spread over the processes (or trained data "
                         "parallel when there are fewer SAEs than processes), not latent-sharded; drop --shard-latents")
    folders = {}
    if args.resume:
        saved = json.loads((out / SEVERAL_RUNS).read_text())
        plan = [{key: entry[key] for key in ("folder", "hook", "k", "d_sae")} for entry in saved["runs"]]
        given = copy.copy(args)
        given.hook = given.k = given.d_sae = None  # each SAE's own, from its folder
        for entry in plan:
            folder = latest_checkpoint(out / entry["folder"])
            if folder is None:
                raise FileNotFoundError(f"{out / entry['folder']}: no complete checkpoint to resume "
                                        "(start again with --overwrite)")
            differences = resume_differences(given, folder)
            if differences:
                raise ValueError(f"--resume continues {folder} with the run's own settings, and these flags "
                                 f"differ from them: {'; '.join(differences)}")
            folders[entry["folder"]] = folder
        configs = [TrainerConfig.load(folder) for folder in folders.values()]
        source = _open_source(args, list(dict.fromkeys(entry["hook"] for entry in plan)), configs[0].data)
    else:
        if args.data is not None and args.hook is not None:
            raise ValueError("--hook: several hooks read a model's activations; --data gives one SAE's (drop one)")
        source = _open_source(args, [None] if args.data is not None else _values(setting(args, "hook")))
        plan = _plan(args, {None: source.d_in} if args.data is not None else dict(source.widths))
        configs = None  # the same steps and stream for every SAE: the first's config, made when needed
    how, ranks = _placement(len(plan), world)
    if world > 1 and getattr(source, "cache_dirs", None) and source.hook_out is None:
        if configs is None:
            first = copy.copy(args)
            first.hook, first.k, first.d_sae = plan[0]["hook"], plan[0]["k"], plan[0]["d_sae"]
            configs = [TrainerConfig(**run_config(first, source.widths[first.hook])[1])]
        fill_s = _fill_cache(source, configs, world, rank)
    else:
        fill_s = 0.0
    mine = [entry for entry, owner in zip(plan, ranks) if owner in (rank, "all")]
    return {"plan": plan, "how": how, "ranks": ranks, "mine": mine, "source": source, "folders": folders,
            "fill_s": fill_s}


def _fill_cache(source, configs: list, world: int, rank: int) -> float:
    """Seconds spent writing chunks r, r + W, r + 2W, ... of those the run reads into the shared cache, at every SAE's hook, so
    that after all ranks meet each reads the cache and none runs the model (the forward split over the ranks)."""
    from fastsae.training.data import ShuffledStream

    needed = set()
    for cfg in configs:  # the chunks each SAE's stream reads: its steps' rows and the initialisation sample
        rows = max(cfg.total_steps * cfg.batch_size, cfg.init_sample_rows)
        needed.update(ShuffledStream(source, seed=cfg.seed, buffer_rows=cfg.shuffle_buffer_rows).chunks_read(rows))
    share = sorted(needed)[rank::world]
    started = time.perf_counter()
    passes = source.cache_chunks(share)
    seconds = time.perf_counter() - started
    print(f"activation cache: rank {rank} of {world} ran the model on {passes} of its {len(share)} chunks (its share "
          f"of the {len(needed)} the run reads; {len(share) - passes} were cached) in {secs(seconds)}", flush=True)
    return seconds


def _start(args, out: Path, device, world: int, rank: int, prepared: dict) -> dict:
    """This rank's trainers by folder (fresh, or resumed from each SAE's checkpoint); rank 0 writes the plan."""
    from fastsae.training import Trainer

    plan, how, mine, folders = prepared["plan"], prepared["how"], prepared["mine"], prepared["folders"]
    views = _views(prepared["source"], list(dict.fromkeys(entry["hook"] for entry in mine)))
    if args.resume:
        saved = json.loads((out / SEVERAL_RUNS).read_text())
        trainers = {entry["folder"]: Trainer.resume(out / entry["folder"], views[entry["hook"]], progress=False,
                                                    dtype=args.dtype, device=device, shard_latents=False,
                                                    local=how == "spread")
                    for entry in mine}
        before = saved.get("world_size", 1)
        if before != world:
            print(f"resuming a run of {len(plan)} SAEs trained on {before} process(es) on {world}: each SAE's "
                  f"checkpoint is a one-process one; {how} now")
        # Each SAE continues from its own step; the one furthest behind trains first until they meet.
        print(f"resuming {len(plan)} SAEs in {out} at steps {({n: t.step for n, t in trainers.items()})}")
    else:
        import torch

        trainers = {}
        for entry in mine:
            run_args = copy.copy(args)
            run_args.hook, run_args.k, run_args.d_sae = entry["hook"], entry["k"], entry["d_sae"]
            run_args.no_progress = True  # several bars would interleave; each logs to its metrics.jsonl
            # Each SAE starts from the seed alone, not from its place in the plan: the same SAE on any
            # number of processes.
            torch.manual_seed(setting(args, "seed"))
            sae, cfg = build_run(run_args, views[entry["hook"]], device)
            trainers[entry["folder"]] = Trainer(sae, views[entry["hook"]], cfg, out / entry["folder"],
                                                overwrite=args.overwrite, local=how == "spread")
    for entry, owner in zip(plan, prepared["ranks"]):
        entry["rank"] = owner
    if rank == 0:  # before training: --resume finds the plan even if the run is stopped
        out.mkdir(parents=True, exist_ok=True)
        (out / SEVERAL_RUNS).write_text(json.dumps({"runs": plan, "world_size": world, "processes": how}, indent=2))
    return trainers


def _all_set(step, device) -> bool:
    """Run `step` (a setup phase) on every rank; all ranks meet after it (the one collective) and all stop, with the
    error printed, if it failed on any."""
    error = None
    try:
        step()
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError, RuntimeError) as exc:
        error = str(exc)
    from fastsae import distributed as fdist

    if fdist.any_rank(error is not None, device):  # every rank stops, not only the one that failed
        print(f"fastsae train: {error or 'another process could not set up its SAEs (its message is above)'}",
              file=sys.stderr)
        return False
    return True


def run_several(args, device) -> int:
    """Several SAEs trained together (fastsae.training.multi): one pass of the data feeds them all; under
    torchrun spread over the processes or data parallel (module docstring)."""
    from fastsae import distributed as fdist
    from fastsae.training import BadDataError
    from fastsae.training.multi import MultiTrainer

    if args.out is None:
        print("fastsae train: several SAEs need --out (each gets a run folder in it)", file=sys.stderr)
        return 2
    out = Path(args.out)
    world, rank = fdist.get_world_size(), fdist.get_rank()
    started = time.perf_counter()
    # Two phases, each ending where all ranks meet: after the first, every chunk the run reads is in a shared
    # activation cache (when there is one), so building the trainers and training run no model forward.
    state = {}
    if not _all_set(lambda: state.update(_prepare(args, out, device, world, rank)), device):
        return 2
    if not _all_set(lambda: state.update(trainers=_start(args, out, device, world, rank, state)), device):
        return 2
    plan, how, trainers = state["plan"], state["how"], state["trainers"]
    if world > 1:
        owners = {r: [e["folder"] for e in plan if e["rank"] == r] for r in range(world)} if how == "spread" else {}
        print(f"{world} processes, {len(plan)} SAEs {how}" + "".join(f"; rank {r}: {', '.join(f)}" for r, f in owners.items()))
    for name, trainer in trainers.items():
        print(f"{name}: {trainer.data!r}; sae {trainer.sae}; {trainer.cfg.total_steps:,} steps of "
              f"{trainer.cfg.batch_size:,} tokens")
    before = {name: trainer.elapsed for name, trainer in trainers.items()}
    multi = MultiTrainer(trainers)
    rc, results = 0, {}
    try:
        results = multi.train()
    except BadDataError as exc:  # spread: this rank's SAEs stop; the others finish theirs
        print(f"fastsae train: {exc}", file=sys.stderr)
        rc = 1
    for name, trainer in trainers.items() if rc == 0 else ():
        print(f"\n== {name} ==")
        rc = max(rc, report(args, trainer, trainer.data, out / name, results[name], started, before[name]))
    # The cache fill is the run's forward too: the overall throughput counts it.
    mine = {"rc": rc, "wall_s": multi.wall_s + state["fill_s"], "saes": {name: _figures(trainer, multi.tokens_before[name])
                                                           for name, trainer in trainers.items()}}
    ranks = _gather(mine)
    if rank == 0:
        _summarise(out, plan, how, world, ranks)
    return max(r["rc"] for r in ranks)


def _figures(trainer, tokens_before: int) -> dict:
    row = trainer.last_metrics
    return {"step": trainer.step, "tokens": trainer.tokens_seen, "session_tokens": trainer.tokens_seen - tokens_before,
            "fvu": row.get("fvu"), "l0": row.get("l0"), "tokens_per_s": row.get("tokens_per_s"), "elapsed_s": trainer.elapsed}


def _summarise(out: Path, plan: list, how: str, world: int, ranks: list) -> None:
    """Rank 0: every SAE's figures and the run's overall throughput, printed and added to sae_runs.json."""
    saes = {}
    for figures in ranks:  # data parallel: every rank reports the same SAEs, with the same figures
        saes.update(figures["saes"])
    wall = max(figures["wall_s"] for figures in ranks)
    session = [figures["session_tokens"] for figures in saes.values()]
    throughput = {"wall_s": wall, "data_tokens_per_s": max(session, default=0) / max(wall, 1e-9),
                  "sae_tokens_per_s": sum(session) / max(wall, 1e-9)}
    print(f"\n== all {len(plan)} SAEs ({how}{f', {world} processes' if world > 1 else ''}) ==")
    for entry in plan:
        f = saes.get(entry["folder"], {})
        fvu, l0, tps = f.get("fvu"), f.get("l0"), f.get("tokens_per_s")
        print(f"{entry['folder']}: rank {entry['rank']}, step {f.get('step', '?')}, fvu "
              f"{'-' if fvu is None else f'{fvu:.4f}'}, l0 {'-' if l0 is None else f'{l0:.1f}'}, "
              f"{'-' if tps is None else f'{tps:,.0f}'} tokens/s in its own steps")
    print(f"overall: {throughput['data_tokens_per_s']:,.0f} tokens/s of data (each feeds every SAE on its hook), "
          f"{throughput['sae_tokens_per_s']:,.0f} tokens/s summed over the SAEs, over {secs(wall)} of wall clock "
          "(initialisation and the model's forward included, any cache filling before training too)")
    (out / SEVERAL_RUNS).write_text(json.dumps({"runs": plan, "world_size": world, "processes": how,
                                                "throughput": throughput}, indent=2))
