"""Where the randomness of a DP mechanism comes from: secret OS entropy, unless a loud debug switch says otherwise.

Why this module exists: a Gaussian mechanism protects only while its noise is unknown to the observer. If the noise
(or the Poisson sample) is drawn from a generator seeded by values the observer knows -- the run config's seed, the
site id, the server-chosen run id, the round -- the observer regenerates the noise and subtracts it, and the release
is the noiseless clipped sum: epsilon is void. So every DP draw is seeded from ``secrets`` (the OS CSPRNG) at the
party that adds the noise, and nothing derived from that seed ever leaves it.

- ``secret_seed()``: 63 bits of OS entropy. Used per site round (Poisson sampling, dropout / ITM negatives) and, in
  ``secure_mode``, freshly for every noise tensor drawn.
- ``GaussianNoise``: the noise of one mechanism. ``secure_mode`` additionally applies the floating-point mitigation
  of Holohan et al. 2021 that Opacus' ``secure_mode`` uses (discard one draw, return the sum of 4 draws / 2, which is
  exactly N(0, std^2)). Opacus' own CSPRNG (torchcsprng) is not installed, so the generator is torch's Mersenne
  Twister reseeded from OS entropy before every tensor: its state never spans more than one tensor's draws.
  Noise for a GPU tensor is drawn on that GPU (no CPU draw and copy) by a generator on that device, seeded and, in
  ``secure_mode``, reseeded exactly like the CPU one.
- ``public_seed(*parts)``: a seed derived from public values. For randomness that protects nothing (canary audits'
  harness, tests) and for the ``privacy.insecure_reproducible_noise`` debug switch, whose ledger events are marked
  not private. Never for a released DP draw otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

import torch

logger = logging.getLogger("mlip_fed.privacy")

#: What the ledger records as a DP event's noise source (``details["noise_source"]``); the audit reads it.
SECRET_SOURCE = "os_entropy"
INSECURE_SOURCE = "insecure_reproducible"

INSECURE_WARNING = (
    "privacy.insecure_reproducible_noise=true: the DP noise, Poisson sample and prototype-release noise are derived "
    "from the experiment seed, site id, run id and round, which the server knows; it can subtract the noise. "
    "This round is NOT PRIVATE (debugging only; recorded in the ledger and flagged by the audit)"
)


def secret_seed() -> int:
    """63 bits from the OS CSPRNG (``secrets``): a seed nobody outside this process can know or replay."""
    return secrets.randbits(63)


def public_seed(*parts: object) -> int:
    """A stable 63-bit seed from public values (BLAKE2b). Not secret: see the module docstring for where it may be used.

    Keyed by a ``secret_seed()`` among ``parts`` it is a PRF output, i.e. secret again.
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**63)


class GaussianNoise:
    """N(0, std^2) draws for one DP mechanism.

    ``seed=None`` (the default, and what every site uses): the generator is seeded from OS entropy, and in
    ``secure_mode`` reseeded from OS entropy before every tensor. An int ``seed`` makes the stream reproducible --
    for tests and the canary-audit harness, whose noisy outputs are never released -- and logs a warning once.
    """

    def __init__(self, seed: int | None = None, *, secure_mode: bool = True) -> None:
        self.reproducible = seed is not None
        self.secure_mode = secure_mode
        self._seed = seed
        self.generator = torch.Generator().manual_seed(secret_seed() if seed is None else seed)
        #: One generator per accelerator the noise is drawn on, made on first use (see ``generator_for``).
        self._device_generators: dict[torch.device, torch.Generator] = {}
        if self.reproducible:
            logger.warning("DP noise seeded with a caller-given seed: reproducible, not private if released")

    @property
    def source(self) -> str:
        return INSECURE_SOURCE if self.reproducible else SECRET_SOURCE

    def generator_for(self, device: torch.device | str | None) -> torch.Generator:
        """The generator drawing noise on ``device``: ``self.generator`` on the CPU; on an accelerator a generator on
        that device, seeded from OS entropy (or, reproducibly, from the caller's seed and the device)."""
        device = torch.device("cpu" if device is None else device)
        if device.type == "cpu":
            return self.generator
        if device.index is None and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        generator = self._device_generators.get(device)
        if generator is None:
            seed = secret_seed() if self._seed is None else public_seed(self._seed, device)
            generator = self._device_generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generator

    def sample(
        self, shape: torch.Size | tuple[int, ...], std: float, *, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """A float32 tensor of N(0, std^2) draws on ``device`` (default CPU), drawn there by ``generator_for(device)``
        (zeros when std is 0: noise explicitly off)."""
        device = torch.device("cpu" if device is None else device)
        if std == 0:
            return torch.zeros(shape, device=device)
        generator = self.generator_for(device)
        if self.secure_mode and not self.reproducible:
            generator.manual_seed(secret_seed())
        size = tuple(shape)
        if not self.secure_mode:
            return torch.normal(0.0, std, size=size, generator=generator, device=device)
        # Holohan et al. 2021 (as Opacus' _generate_noise with secure_mode): sum of 2n draws / sqrt(2n), n = 2.
        torch.normal(0.0, std, size=(1,), generator=generator, device=device)  # discarded, as Opacus does
        total = torch.zeros(size, device=device)
        for _ in range(4):
            total += torch.normal(0.0, std, size=size, generator=generator, device=device)
        return total / 2
