"""Model architectures (built from a ModelConfig), their configs, and the checkpoint loader."""
