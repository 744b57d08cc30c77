"""Installs the engine's write containment (stages.engine.paths.contained) as roidb's write guard, so roidb's
writers (gt-roidb caches, the stat cache, eval result files) prove their paths inside the roots too. Imported by every
stages module that imports roidb (the engine itself may not import roidb)."""
from roidb.guard import set_write_guard

from .engine.paths import contained

set_write_guard(contained)
