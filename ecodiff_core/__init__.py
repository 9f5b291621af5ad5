"""EcoDiff engine: learnable structured sparsity for diffusion models, in plain PyTorch.

Never imports ComfyUI; works on any ``nn.Module`` an architecture table recognises.
"""
__version__ = "0.1.0"
