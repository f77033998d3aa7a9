"""The states of a run's Poisson sampler and noise generator: the secret DP rests on.

Whoever can reproduce them knows every batch's members and every noise draw, and can subtract
the noise from the released adapter. torch's CPU generator is a Mersenne Twister whose
``manual_seed`` keeps 32 bits of any seed, so a secret state is written whole: its 624 words
(19,968 bits) from the OS's entropy.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

MT_WORDS = 624
# torch's CPUGeneratorImplStateLegacy: int64 seed, int32 left, int32 seeded, uint64 next, then
# uint64 state[624] holding one 32-bit word each (checked by tests/test_secret_noise.py).
_WORDS_AT = 24


def seeded_state(seed: int) -> torch.Tensor:
    """The state ``manual_seed(seed)`` gives: reproducible from the (published) seed."""
    return torch.Generator().manual_seed(seed).get_state()


def secret_state() -> torch.Tensor:
    """A generator state whose every Mersenne Twister word comes from the OS's entropy."""
    # seeding first leaves valid bookkeeping (left = 1: the next draw regenerates from the words)
    state = seeded_state(secrets.randbits(32)).numpy().copy()
    words = state[_WORDS_AT : _WORDS_AT + 8 * MT_WORDS].view("<u8")
    words[:] = np.frombuffer(secrets.token_bytes(4 * MT_WORDS), dtype="<u4")
    return torch.from_numpy(state)
