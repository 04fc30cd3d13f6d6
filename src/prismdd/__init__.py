"""prismdd: dataset distillation with PRISM and the SRe2L family."""
__version__ = "0.1.0"
