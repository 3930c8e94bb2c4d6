"""KV-cache quantizer library: storage bases, bit allocation, codebooks, QJL and the packed format.

Entry point: `build_codec(profile, bits=...)` -> `KVCodec` (see `codec`). The packed byte layout that
kernels read is documented in `packing` (and FORMAT.md next to this file).
"""
from .allocation import allocate_bits, waterfill
from .codebooks import distortion, fit_codebook, lloyd_max
from .codec import KVCodec, LayerCodec, RESEARCH_KNOBS, build_codec, valid_bits_range
from .format import Group, TensorFormat
from .hadamard import randomized_hadamard, random_orthogonal, sylvester_hadamard
from .qjl import score_correction as qjl_score_correction

__all__ = [
    "Group", "TensorFormat", "LayerCodec", "KVCodec", "build_codec", "valid_bits_range", "RESEARCH_KNOBS",
    "lloyd_max", "distortion", "fit_codebook", "allocate_bits", "waterfill",
    "randomized_hadamard", "random_orthogonal", "sylvester_hadamard", "qjl_score_correction",
]
