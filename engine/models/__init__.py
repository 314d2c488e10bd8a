"""The model zoo: constructors that jobs name, with `get_model(name, **args)`.

Registered models: ``mlp``, ``lenet``, ``resnet``, ``transformer_lm``, ``lstm_lm``. A job may
also name its own constructor as ``"package.module:function"``. Each constructor's docstring
gives its arguments and the input it expects.

Example:
    >>> from dptrain import engine
    >>> from dptrain.engine.models import get_model, list_models
    >>> list_models()
    ['lenet', 'lstm_lm', 'mlp', 'resnet', 'transformer_lm']
    >>> get_model("lenet", image_size=8)(engine.zeros(1, 1, 8, 8)).shape
    (1, 10)
"""

from dptrain.engine.models import lenet, lstm_lm, mlp, resnet, transformer_lm  # noqa: F401 (register)
from dptrain.engine.models.lenet import LeNet
from dptrain.engine.models.lstm_lm import LSTMLanguageModel
from dptrain.engine.models.registry import (
    get_constructor,
    get_model,
    import_reference,
    list_models,
    model_signature,
    parse_reference,
    register_model,
)
from dptrain.engine.models.resnet import BasicBlock, ResNet
from dptrain.engine.models.transformer_lm import TransformerLM

__all__ = ["get_model", "get_constructor", "list_models", "register_model", "model_signature",
           "parse_reference", "import_reference", "LeNet", "ResNet", "BasicBlock",
           "TransformerLM", "LSTMLanguageModel"]
