"""Refine methods: CAMs -> pseudo masks, one module per method behind one interface
(pipeline/refinement/method.py). ``refine.method`` picks one of :data:`METHODS`."""
from __future__ import annotations

from pipeline.core.config import Config
from pipeline.refinement.irn import IrnWalk
from pipeline.refinement.method import CrfMasks, RefineMethod
from pipeline.refinement.psa import PsaWalk

METHODS: dict[str, type[RefineMethod]] = {method.name: method for method in (CrfMasks, PsaWalk, IrnWalk)}
# The folders of the networks refine's methods train, in the run folder.
NETWORK_FOLDERS = tuple(method.network_folder for method in METHODS.values() if method.network_folder)


def method_for(cfg: Config) -> RefineMethod:
    return METHODS[cfg.refine.method](cfg)
