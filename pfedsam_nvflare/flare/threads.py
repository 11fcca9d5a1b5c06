"""One thread budget per machine: a site process takes its share of the machine's cores.

Torch starts one thread per core in every process, so sites that share a machine (the simulator's clients, a POC)
oversubscribe it and each runs slower than alone. A user's ``OMP_NUM_THREADS`` always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sites_on_this_machine(fl_ctx: FLContext) -> int:
    """How many sites train on this machine at once: the simulator's concurrent clients (``-t``, at most ``-n``),
    the client kits beside this one in a POC workspace, or 1 for a production site alone on its machine."""
    if fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False):
        args = fl_ctx.get_prop(FLContextKey.ARGS)
        clients = getattr(args, "clients", None)
        count = len(clients.split(",")) if isinstance(clients, str) else getattr(args, "n_clients", None) or 1
        return max(1, min(getattr(args, "threads", None) or 1, count))
    kit = Path(fl_ctx.get_engine().get_workspace().get_root_dir()).resolve()
    kits = [folder for folder in kit.parent.iterdir() if (folder / "startup" / "fed_client.json").is_file()]
    return max(1, len(kits))


def set_thread_budget(fl_ctx: FLContext) -> tuple[int, str]:
    """Set torch's threads to this site's share of the cores unless ``OMP_NUM_THREADS`` is set; the number of
    threads and why, for the log."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores, sites = available_cores(), sites_on_this_machine(fl_ctx)
    torch.set_num_threads(max(1, cores // sites))
    return torch.get_num_threads(), f"{cores} cores shared by {sites} site(s) on this machine"
