"""bitnet-compile: kernel-generation compiler and autotuner for ternary (BitNet b1.58) models."""

__version__ = "0.1.0"
