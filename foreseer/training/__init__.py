"""Offline training and research tools: the Medusa heads, the layer-skip search, the shipped LoRA adapters and
the length predictors' datasets, training and evaluation. They drive the engine from outside, as a user would;
nothing on the serving path imports them."""
