"""The loss model: per-sample gradients and where they are stored, the quadratic model Q,
saliencies from it, held-out scores, and sharing the work across processes; for large
models, the layer-wise loss model (each linear layer's input Gram XᵀX)."""
