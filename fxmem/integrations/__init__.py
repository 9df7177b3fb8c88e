"""Recipes for training frameworks. Each submodule imports its framework when it is imported:

- :mod:`fxmem.integrations.huggingface`: the Hugging Face ``Trainer`` (``pip install 'fxmem[hf]'``).

Code that calls ``torch.compile`` itself (PyTorch Lightning, for one) takes the ``fxmem`` backend
with ``options={"budget": ...}``, or with the budget in the environment variable ``FXMEM_BUDGET``.
"""

__all__: list[str] = []
