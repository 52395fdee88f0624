"""Make PyPI's CUDA builds of torchvision/torchaudio/torchcodec harmless beside CPU torch.

Loaded at interpreter start by a .pth file that `make` writes into the CPU
virtual environment (so vLLM's spawned engine and worker processes get it
too). PyPI only has CUDA builds of these packages; their compiled parts fail
to load beside torch's CPU build ("operator torchvision::nms does not exist").
- torchaudio and torchcodec are hidden: transformers and vLLM then treat them
  as not installed, which is true in every way that matters here.
- torchvision stays importable (vLLM's LLaVA imports an image processor that
  needs it), minus the registrations for its missing compiled operators. Its
  pure-Python transforms work; torchvision.ops and torchvision.io do not, and
  nothing on the CPU path uses them.
"""

import sys
import types

for name in ("torchaudio", "torchcodec"):
    sys.modules.setdefault(name, None)
for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(name, types.ModuleType(name))
