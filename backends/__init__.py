"""fxquant.backends: quantized custom ops (torch.library), their reference implementations and Triton kernels."""
