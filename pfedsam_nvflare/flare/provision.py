"""A provisioning builder, so that the startup kits ``nvflare provision`` makes are ready for pFedSAM jobs."""

from __future__ import annotations

from nvflare.lighter.constants import ParticipantType
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from .site_policy import allow_pfedsam_in


class AllowListBuilder(Builder):
    """Writes ``local/resources.json`` for the server and every client: FLARE's resources with
    ``pfedsam_nvflare.`` added to the class allow-list. List it after ``StaticFileBuilder`` in ``project.yml``."""

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        for participant in project.get_all_participants([ParticipantType.SERVER, ParticipantType.CLIENT]):
            path = allow_pfedsam_in(ctx.get_local_dir(participant))
            ctx.info(f"allowed pfedsam_nvflare components for {participant.name} in {path}")
