"""Example networks and the LightningModule used by ``train.py`` and the configs in ``pat_callbacks/conf/``."""

from pat_callbacks.app.models.classifier import Classifier
from pat_callbacks.app.models.lm import CharGPT, LanguageModel
from pat_callbacks.app.models.nets import MLP, ConvBase
from pat_callbacks.app.models.pretrained import PretrainedModel

__all__ = ["MLP", "CharGPT", "Classifier", "ConvBase", "LanguageModel", "PretrainedModel"]
