"""Serving HTTPS directly: checking ``[server] certfile``/``keyfile`` before hypercorn loads them.

Hypercorn loads the certificate only once the daemon is half started, and the errors it gets from
`ssl` do not name the file (``[Errno 2] No such file or directory``, ``[SSL] PEM lib``). So the
daemon checks the pair first and says which key and file are wrong, in one line.
"""

from __future__ import annotations

import ssl


class TLSError(OSError):
    """The certificate or key cannot be used. An `OSError`, like every refusal of the environment,
    so ``wacored run`` prints it as one line and exits 1."""


def check_server_tls(certfile: str, keyfile: str) -> None:
    """Load the certificate chain and key the way hypercorn will, or raise `TLSError`.

    Error handling:
        `TLSError` names the config key and file: missing or unreadable (with the OS's reason),
        not PEM, not matching each other, or an encrypted key (there is no way to give its
        password, and OpenSSL would otherwise prompt on a terminal that systemd does not have).
    """
    for key, path in (("certfile", certfile), ("keyfile", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSError(f"server.{key} {path}: {exc.strerror or exc}") from exc
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except ssl.SSLError as exc:
        raise TLSError(
            f"server.certfile {certfile} and server.keyfile {keyfile}: not a PEM certificate and its "
            f"unencrypted private key ({exc.reason or exc})"
        ) from exc


def check_ca_file(service: str, ca_file: str) -> None:
    """Load a service's ``ca_file`` the way its lanes will, or raise `TLSError` naming it."""
    if not ca_file:
        return
    try:
        ssl.create_default_context().load_verify_locations(cafile=ca_file)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        raise TLSError(f"services.{service}.ca_file {ca_file}: not a readable PEM CA certificate ({reason})") from exc


def _no_password() -> str:
    return ""
