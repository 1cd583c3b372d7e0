"""Kernels: the computations shared by mechanism families, importing only `attnlab.core`.

* `linear_scan`  — the linear family's recurrence (chunk-parallel, recurrent, bidirectional, reference);
* `block_sparse` — block layouts, their plan and the recomputing autograd function (and the Flex backend);
* `neighborhood` — tiled neighborhood attention on grids (GEMM form, recomputing backward);
* `grid`         — checks and helpers of attention on grids of tokens;
* `sdpa`         — softmax attention through torch's scaled_dot_product_attention;
* `flex`         — FlexAttention, compiled once per process;
* `compiled`     — numba: whether it is here, the dtypes and devices its compiled loops serve;
* `pool`         — the CPU worker threads (one intra-op thread each) the chunked kernels run on.
* `sizes`        — chunk and block sizes capped by the input (cost follows the input, not the knob).

Mechanism folders (`attnlab.mechanisms.*`) keep the module bases and the mechanisms.
"""
