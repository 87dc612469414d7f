"""Wan Animate: the Wan blocks; after every ``inject_face_latents_blocks``-th block the forward adds the output of a
face adapter (cross-attention of the hidden stream to motion features from ``face_pixel_values``) to the hidden
stream, by index: an index-added input on every call, and one that reads the stream (``glue_reads_stream``: a hit
cannot evaluate it on the stream the skipped blocks would have produced, so the cached residual holds it and the hit
undoes it between the middle blocks; measured better than evaluating it on the hit's stream, README). The pipeline
passes a new ``face_pixel_values`` tensor to each unconditional call (the face blanked out), so it is no
conditioning for the generation rule."""

from __future__ import annotations

from . import Family, register_family

register_family(Family(name="wan-animate", transformer="WanAnimateTransformer3DModel",
                       pipelines=("WanAnimatePipeline",), chains=(("blocks",),), index_added=("face_pixel_values",),
                       glue_reads_stream=True,
                       # transformer_wan_animate's own copy of WanTransformerBlock, not in diffusers' block registry
                       contracts={"WanTransformerBlock": (0, None, "hidden_states", "encoder_hidden_states")},
                       ungroupable="its forward adds the face adapter's output to the hidden stream after every "
                                   "`inject_face_latents_blocks`-th block, inside the groups", tested=True))
