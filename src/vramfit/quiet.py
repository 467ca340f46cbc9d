"""Keep library chatter out of vramfit's output (train and merge processes only).

vramfit prints one progress line per log step; deprecation warnings, progress bars
and "no GPU found" notices from the libraries underneath would bury it.
VRAMFIT_DEBUG=1 leaves everything on.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries(device: str) -> None:
    if os.environ.get("VRAMFIT_DEBUG"):
        return
    if device == "cpu":
        # DeepSpeed (imported by transformers and peft when installed) warns when it finds no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    # bitsandbytes warns on CPU-only machines about optional CPU kernels, and offline the
    # kernels hub it fetches them with warns that it cannot check their publisher.
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
