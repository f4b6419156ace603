"""Response-length perception (Zheng et al., NeurIPS 2023): predict, before generating, how long the model's own
answer will be. predictors.py holds the predictors behind one interface (PiA prompting, the LoRA-tuned model, a
probe on the prefill's hidden state), probe.py the probe head; foreseer/training/lengths builds their datasets,
trains and scores them."""

from foreseer.lengths.predictors import PREDICTORS, LengthPredictor, create_predictor, parse_pia_length, register

__all__ = ["PREDICTORS", "LengthPredictor", "create_predictor", "parse_pia_length", "register"]
