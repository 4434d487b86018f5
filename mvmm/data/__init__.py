"""Data layer: geometry, images, atlases, cases, file I/O and the synthetic phantom.

The names below are imported on first use (PEP 562), so that ``mvmm.data.io`` and
``mvmm.data.labels`` — what ``mvmm evaluate`` needs — load without torch.
"""

import importlib

_WHERE = {"Atlas": "mvmm.data.atlas", "Grid": "mvmm.core.grid", "Image": "mvmm.data.image",
          "LabelSet": "mvmm.data.labels", "CARDIAC_LABELS": "mvmm.data.labels", "Subject": "mvmm.data.subject",
          "CaseSample": "mvmm.data.subject"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mvmm.data' has no attribute {name!r}")
