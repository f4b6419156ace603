"""Response-length perception, offline: build labelled datasets with the engine, train the predictors that
foreseer/lengths serves, and score them (`foreseer lengths build|train|eval`)."""
