"""FP8 mixed precision (report §3.3): the numerics leaf `formats` (E4M3/E5M2, tile and block quantisation), the GEMM
backends `gemm` (block-scaled GEMMs and the tensor-core accumulation model), and `linear` (`FP8Linear`,
`convert_to_fp8`).

No re-exports, so that importing `fp8.formats` (as the checkpoint loader and the accounting do) never loads the
layer-swapping code.
"""
