"""Who may talk to an aggregator: loopback by default, CURVE keys for anything else.

An aggregator bound to loopback or an ``ipc://`` path is reachable from this machine only. On any
other address it requires CURVE authentication and encryption (ZeroMQ's, through pyzmq's
``zmq.auth``): it holds a secret key, and accepts only clients whose public key is in a directory
of allowed keys. Without keys, it refuses to start there unless told ``insecure``.

Keys are the certificate files ``distsum keygen`` writes (``zmq.auth.create_certificates``):
``NAME.key`` holds the public key, ``NAME.key_secret`` both keys.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
import zmq.auth

from distsum._errors import DistsumError

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

__all__ = ["ClientKeys", "ServerKeys", "generate", "is_local", "require_curve"]


def require_curve() -> None:
    if not zmq.has("curve"):
        raise DistsumError(
            f"the installed libzmq ({zmq.zmq_version()}) was built without CURVE, so distsum cannot "
            "authenticate; install a pyzmq wheel (its bundled libzmq has CURVE) or bind to loopback"
        )


def is_local(addr: str) -> bool:
    """Whether ``addr`` (a ZeroMQ endpoint to bind) is reachable from this machine only."""
    if addr.startswith(("ipc://", "inproc://")):
        return True
    if not addr.startswith("tcp://"):
        return False
    host = addr[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host in ("*", ""):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except OSError:
        return False


def generate(directory: str | os.PathLike[str], name: str) -> tuple[str, str]:
    """Write a key pair ``NAME.key`` (public) and ``NAME.key_secret``; return their paths."""
    require_curve()
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(os.fspath(directory), name)
    os.chmod(secret, 0o600)
    return os.fspath(public), os.fspath(secret)


def _load(path: str, what: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the {what} from {path!r}: {e}") from None
    if secret and not secret_key:
        raise ValueError(f"{path!r} holds no secret key; give the {what} (the .key_secret file)")
    return public_key, secret_key


@dataclass(frozen=True)
class ServerKeys:
    """The aggregator's key pair and the directory of client public keys it accepts."""

    secret_file: str
    clients_dir: str

    def apply(self, context: zmq.Context, sock: zmq.Socket) -> ThreadAuthenticator:
        """Make ``sock`` (not yet bound) a CURVE server; the authenticator must run while it does."""
        require_curve()
        public, secret = _load(self.secret_file, "aggregator's secret key", secret=True)
        if not os.path.isdir(self.clients_dir):
            raise ValueError(f"allowed client keys: {self.clients_dir!r} is not a directory")
        # Imported here: it brings in asyncio, tens of milliseconds that every rank would
        # otherwise pay at import.
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=self.clients_dir)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True
        return auth


@dataclass(frozen=True)
class ClientKeys:
    """A rank's key pair and the aggregator's public key."""

    secret_file: str
    server_public_file: str

    def apply(self, sock: zmq.Socket) -> None:
        require_curve()
        public, secret = _load(self.secret_file, "rank's secret key", secret=True)
        server_public, _ = _load(self.server_public_file, "aggregator's public key", secret=False)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public
