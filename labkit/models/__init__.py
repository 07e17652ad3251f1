"""Small Trax models built from labkit's layers (`labkit.layers`), one module per model.

Layers are one attention each; a model composes them with normalisation, feed-forward blocks and
checkpointing. Dependency arrows: `attention` <- `layers` <- `models` <- notebooks.
"""

from labkit.models.linformer import Checkpointed, LinformerEncoder

__all__ = ["Checkpointed", "LinformerEncoder"]
