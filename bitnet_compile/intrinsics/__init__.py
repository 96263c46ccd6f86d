"""Tensor intrinsics: hand-picked instruction sequences TVM substitutes into scheduled loops."""
