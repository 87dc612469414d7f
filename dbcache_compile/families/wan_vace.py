"""Wan VACE (Wan 2.1 VACE, Wan 2.2 VACE-Fun): the Wan blocks plus ``vace_blocks``, which run before them (always
computed, in no chain) and turn ``control_hidden_states`` into one hint per block of ``vace_layers``; the forward adds
hint k (times its scale) to the hidden stream after that block, by index: an index-added input on every call."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="wan-vace", transformer="WanVACETransformer3DModel", pipelines=("WanVACEPipeline",),
                       chains=(("blocks",),), index_added=("control_hidden_states",),
                       ungroupable="its forward adds a VACE hint to the hidden stream after the blocks of "
                                   "`vace_layers`, inside the groups", tested=True))
