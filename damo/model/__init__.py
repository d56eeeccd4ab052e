"""DaMO: frozen encoders -> global residual -> temporal pathway -> T-Fuseformer -> bridge -> LLM.

Pure PyTorch + transformers + peft. Imports nothing of the platform but `damo.config`; loaders
take local directories, or a `resolve` callable that turns a URI into one.
"""

from damo.model.backbones import FrozenEncoders
from damo.model.damo import DamoModel
from damo.model.llm import PromptBuilder, splice_video
from damo.model.video import VideoFeatures

__all__ = ["DamoModel", "FrozenEncoders", "PromptBuilder", "VideoFeatures", "splice_video"]
