"""`vmpower-guest`: the guest side of the power channel, run inside a VM.

Owns everything a guest needs to ask its host for frequency changes the way DPDK's
``guest_cli`` does: finding the power ports (:mod:`vmpower.guest.ports`), talking
through one of them (:mod:`vmpower.guest.channel`), building requests from options
(:mod:`vmpower.guest.requests`) and the command line (:mod:`vmpower.guest.cli`).

It runs in a minimal guest: standard library only (``pyudev`` when importable), and
from this project it imports :mod:`vmpower.protocol` and :mod:`vmpower.errors` alone.
"""
