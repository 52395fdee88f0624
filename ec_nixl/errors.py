"""Typed errors: every way a transfer or a control-plane call can fail, by cause.

Callers branch on the type (fall back, retry elsewhere, fail the request), so
each cause has exactly one class and the message names the item or peer.
"""


class ECNixlError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ECNixlError, ValueError):
    """A setting is missing or has a bad value; the message names it."""


class PoolFullError(ECNixlError):
    """No room in a registered arena even after evicting every unleased item."""


class NotFoundError(ECNixlError, KeyError):
    """The exporter does not hold (or no longer holds) these mm_hashes."""

    def __init__(self, message: str, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PeerDeadError(ECNixlError):
    """The remote process is gone or unreachable."""


class WorkerLostError(ECNixlError):
    """A PD worker (tensor-parallel rank) closed its link to the scheduler mid-call:
    it died or restarted. The encoder is not at fault: its lease goes back."""


class LoadLostError(ECNixlError):
    """A PD worker was told to load an item it does not hold, and could not read it again
    from its encoder. vLLM has scheduled the item's tokens without encoding it: the step
    cannot go on."""


class DeadlineExceededError(ECNixlError, TimeoutError):
    """A call or a transfer did not finish before its deadline."""


class RefusedError(ECNixlError):
    """A request was refused: bad descriptor, wrong dtype or shape, bad input."""


class HandshakeError(ECNixlError):
    """The two sides cannot work together (protocol or compatibility mismatch)."""


class AuthError(ECNixlError, PermissionError):
    """The caller did not present the shared token or certificate."""


class StaleDataError(ECNixlError):
    """A read finished after its lease could have expired: the bytes may be reused memory."""
