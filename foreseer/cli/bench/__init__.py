"""foreseer bench ...: each benchmark's flags come from its arguments dataclass in foreseer/bench."""
