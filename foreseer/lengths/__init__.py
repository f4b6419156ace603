"""Response-length perception (Zheng et al., NeurIPS 2023): predict, before generating, how long the model's own
answer will be. dataset.py builds the labels with the engine, predictors.py holds the predictors behind one
interface (PiA prompting, a probe on the prefill's hidden state), evaluate.py scores them, cli.py runs it all."""

from foreseer.lengths.predictors import PREDICTORS, LengthPredictor, create_predictor, parse_pia_length, register

__all__ = ["PREDICTORS", "LengthPredictor", "create_predictor", "parse_pia_length", "register"]
