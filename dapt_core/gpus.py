"""Dense bf16 tensor-core peaks of common GPUs: `dapt plan`'s compute estimate and the training loop's MFU.

A module of its own, importing nothing: the training stages' code versions include what they import, and reaching
this table through `dapt_core.plan` (which reads raw inputs through discovery and ingest) made every edit to the data
stages re-run CPT and SFT.
"""

# TFLOP/s, from vendor datasheets, without sparsity.
GPU_PEAK_TFLOPS = {
    "A100": 312.0,
    "H100": 989.0,
    "H200": 989.0,
    "L4": 121.0,
    "A10G": 125.0,
    "RTX4090": 165.0,
    "L40S": 362.0,
}
