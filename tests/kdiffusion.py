"""k-diffusion's samplers as a reference (a test-only dependency, installed with ``--no-deps``).

The package's ``__init__`` imports its training and evaluation code (scikit-image, CLIP, clean-fid,
...), which the tests do not need; ``k_diffusion.sampling`` needs only scipy, torchsde and
torchdiffeq. Where the full package does not import, its directory is mounted as an empty package so
that ``k_diffusion.sampling`` (and the ``utils`` it imports) load alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def sampling():
    """The module ``k_diffusion.sampling``; skips the test if k-diffusion is not installed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    if importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq")
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:  # a dependency of the package's other modules is missing
        pass
    spec = importlib.util.find_spec("k_diffusion")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["k_diffusion"] = package
    return importlib.import_module("k_diffusion.sampling")
