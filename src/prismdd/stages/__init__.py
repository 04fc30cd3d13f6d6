"""The pipeline stages. Each module is one function from a dataclass config (and its input folders) to an
output folder with a manifest; a stage imports ``prismdd.core`` and ``prismdd.artifacts`` only, never
another stage, so each can be read, tested and replaced on its own."""
