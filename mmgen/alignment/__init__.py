"""Representation alignment for AR decoders: ARRA (global, <HYBNEXT>-style), REPA-style (patches), OLA-style
(embedding distillation). Frozen target encoders behind one interface; losses on the decoder's hidden
states; projectors are training-only and dropped at inference, so sampling is unchanged."""

from mmgen.alignment.encoders import (ENCODERS, EfficientNetLite0Target, OpenCLIPTarget, TargetEncoder,
                                      TokenizerTarget, make_target_encoder)
from mmgen.alignment.losses import ALIGNMENT_TYPES, AlignmentConfig, AlignmentHead

__all__ = ["ALIGNMENT_TYPES", "ENCODERS", "AlignmentConfig", "AlignmentHead", "EfficientNetLite0Target",
           "OpenCLIPTarget", "TargetEncoder", "TokenizerTarget", "make_target_encoder"]
