"""How every part of the system names the models of a store: the store's folders, the Serve
deployments, the metrics' labels, the job names and the command line all say `expert-003`
for expert 3, through `expert_name`, so no two places can disagree."""

from __future__ import annotations

import re
from typing import Literal

Kind = Literal["expert", "router", "monolith", "featnet", "vae"]
EXPERTS_FOLDER = "experts"
ROUTER_PREFIX = "router"
MONOLITH_PREFIX = "monolith"
FEATNET_PREFIX = "featnet"
VAE_PREFIX = "vae"  # `ddm train vae`: a small autoencoder trained on the store's images
# pretrained models a dataset depends on, copied in by `ddm prepare` (pretrained.py)
PRETRAINED_FOLDER = "pretrained"


def expert_name(k: int) -> str:
    """Expert k's name: its store folder, Serve deployment and metrics label."""
    return f"expert-{k:03d}"


def expert_prefix(k: int) -> str:
    """Expert k's checkpoint folder in the store."""
    return f"{EXPERTS_FOLDER}/{expert_name(k)}"


_EXPERT_URI = re.compile(rf"^(?P<store>.+)/{EXPERTS_FOLDER}/expert-(?P<id>[0-9]{{3}})/?$")


def split_expert_uri(uri: str) -> tuple[str, int] | None:
    """(store URI, expert id) of `STORE/experts/expert-NNN`, or None for another URI."""
    m = _EXPERT_URI.match(uri.strip())
    return None if m is None else (m["store"], int(m["id"]))


def model_prefix(kind: Kind, cluster: int | None = None) -> str:
    """The checkpoint folder of a model of `kind` (experts: of `cluster`)."""
    if kind == "expert":
        if cluster is None:
            raise ValueError("an expert's prefix needs its cluster")
        return expert_prefix(cluster)
    return {
        "router": ROUTER_PREFIX,
        "featnet": FEATNET_PREFIX,
        "monolith": MONOLITH_PREFIX,
        "vae": VAE_PREFIX,
    }[kind]
