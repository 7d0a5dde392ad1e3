"""`quiet_libraries()`: keep what third-party libraries log, warn and print off the terminal while rewardtune loads
weights through them.

Offline, loading a hub-backed source (a diffusers UNet, an open_clip model, the aesthetic head, clean-fid's
Inception) makes the libraries speak before rewardtune raises its one-line `PluginError`: huggingface_hub warns
(`UserWarning`), open_clip logs `ERROR:root:...`, diffusers and transformers log through their own handlers, clean-fid
prints. Inside the block, warnings are ignored, logging below CRITICAL is disabled and stdout is captured, so the
`error:` line is the only one. Progress bars (tqdm writes to stderr) still show, so a long download stays visible;
what went to stdout is written out once the block succeeds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence library warnings and logging for the block; replay its stdout if it succeeds."""
    disabled = logging.root.manager.disable
    captured = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.ERROR)
        try:
            with contextlib.redirect_stdout(captured):
                yield
        finally:
            logging.disable(disabled)
    sys.stdout.write(captured.getvalue())
