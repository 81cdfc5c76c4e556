"""Step 01: what this runtime has (GPU, torch, lycolab), shown once after installing."""

from __future__ import annotations

import platform

from lycolab.colab import Workspace
from lycolab.display import Table


def describe(workspace: Workspace) -> Table:
    """The facts that decide speed and options: device, memory, versions, where the workspace is."""
    import torch

    import lycolab

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        device = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    else:
        device = "CPU only (training works, slowly; fp16 and 8-bit optimizers need a GPU)"
    rows = [{"item": "device", "value": device},
            {"item": "python", "value": platform.python_version()},
            {"item": "torch", "value": torch.__version__},
            {"item": "lycolab", "value": getattr(lycolab, "__version__", "dev")},
            {"item": "workspace", "value": str(workspace.root)}]
    return Table(rows, title="environment")
