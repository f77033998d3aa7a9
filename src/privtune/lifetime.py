"""A child process that ends with its parent, whatever kills the parent.

torchrun's ranks and `privtune.team up`'s servers run in sessions of their own (so a
terminal's Ctrl-C reaches only their parent, which stops them in order); a `kill -9` of the
parent then left them running on unseen, training or holding the ports.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def stop_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux's
    PR_SET_PDEATHSIG; it survives exec, so it also serves as a Popen preexec_fn, where ctypes
    is imported already). The kernel means the parent's thread that started it: start such
    children from a thread that lives as long as they should. Through ctypes: no library
    wraps this one call."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
