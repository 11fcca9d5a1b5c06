"""A site's component allow-list: FLARE builds only the classes its ``local/resources.json`` allows, so
every site that runs pFedSAM jobs adds this package's prefix to that list (never ``*``, never warn mode)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST

PACKAGE_PREFIX = "pfedsam_nvflare."


def allow_pfedsam(resources: dict[str, Any]) -> dict[str, Any]:
    """``resources`` with ``pfedsam_nvflare.`` in its allow-list (FLARE's default list where it had none)."""
    allowed = list(resources.get(CLASS_ALLOW_LIST, DEFAULT_CLASS_ALLOW_LIST))
    if PACKAGE_PREFIX not in allowed:
        allowed.append(PACKAGE_PREFIX)
    return {**resources, CLASS_ALLOW_LIST: allowed}


def allow_pfedsam_in(local_dir: str | Path) -> Path:
    """Add the prefix to ``local_dir/resources.json`` (created, or taken from ``resources.json.default``)."""
    local_dir = Path(local_dir)
    target = local_dir / "resources.json"
    source = target if target.exists() else local_dir / "resources.json.default"
    if local_dir.exists() and not local_dir.is_dir():
        raise ValueError(f"{local_dir} is a file, not a site's local/ folder")
    try:
        resources = json.loads(source.read_text()) if source.exists() else {"format_version": 2}
    except ValueError as error:
        raise ValueError(f"{source} is not valid JSON ({error})") from error
    if not isinstance(resources, dict):
        raise ValueError(f"{source} holds a JSON {type(resources).__name__}, not the object FLARE's resources.json is")
    local_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(allow_pfedsam(resources), indent=2) + "\n")
    return target
