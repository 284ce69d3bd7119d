"""tinygrad_llm: MyLLM from scratch on a NumPy autograd engine with Numba kernels."""
