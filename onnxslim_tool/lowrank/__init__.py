"""Low-rank factorization, one job per module; the pass itself is `onnxslim_tool.passes.lowrank`.

- `graph`: reading constants and editing the graph (shared helpers).
- `plan`: `Plan` (method, ranks, cost of one layer) and `Factors` (what the refit can reach).
- `rank`: rank rules shared by every layer kind (params budget, "does it pay").
- `vbmf`: empirical variational Bayesian matrix factorization, a rank estimate from noise.
- `dense`: Gemm / MatMul SVD.
- `conv`: conv decompositions (channel SVD, spatial SVD, CP, Tucker-2), grouped convs per group.
- `conv_rank`: rank choice per conv method.
- `layers`: which nodes can be factorized, or why not.
- `refit`: data-aware refit of the last stage on calibration data.
"""
