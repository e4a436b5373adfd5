"""kmnist-batch: recognize handwritten Kuzushiji character crops.

    from kmnist_core import load_model
    model = load_model("default")          # or a model directory
    model.predict([pil_image, uint8_array])  # -> [Prediction(index, char, codepoint, confidence, probabilities)]
"""

from kmnist_core.errors import KmnistError
from kmnist_core.model_dir import Prediction, Predictor, load_model

__all__ = ["KmnistError", "Prediction", "Predictor", "load_model"]
