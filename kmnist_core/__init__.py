"""kmnist-batch: recognize handwritten Kuzushiji character crops.

    from kmnist_core import load_model
    model = load_model("default")            # or a model directory
    model.predict([pil_image, uint8_array])  # -> [Prediction(index, char, codepoint, confidence, probabilities)]
"""

from kmnist_core.errors import KmnistError

__all__ = ["KmnistError", "Prediction", "Predictor", "load_model"]


def __getattr__(name: str):
    # Lazy: importing torch costs seconds, and Ray's decode workers import kmnist_core without needing it.
    if name in ("Prediction", "Predictor"):
        from kmnist_core import predictor

        return getattr(predictor, name)
    if name == "load_model":
        from kmnist_core.model_dir import load_model

        return load_model
    raise AttributeError(f"module 'kmnist_core' has no attribute {name!r}")
