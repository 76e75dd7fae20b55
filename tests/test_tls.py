"""Serving HTTPS directly from ``[server] certfile``/``keyfile``: a real daemon, a trustme CA."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from wacored.config import Config
from wacored.daemon import run_daemon
from wacored.tls import TLSError, check_server_tls
from wacored.whatsapp import sign, text_webhook

from .conftest import SECRET, Downstream, config_mapping, open_daemon
from .support import clean_env, toml_text


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(certfile), str(keyfile)


def tls_config(tmp_path: Path, services: Downstream, graph: Downstream, certfile: str, keyfile: str) -> Config:
    data = config_mapping(tmp_path, services.url, graph.url, server={"certfile": certfile, "keyfile": keyfile})
    return Config.from_mapping(data, {})


async def test_the_daemon_serves_https_and_accepts_a_signed_webhook(
    tmp_path: Path, services: Downstream, graph: Downstream, ca: trustme.CA, cert_files: tuple[str, str]
) -> None:
    config = tls_config(tmp_path, services, graph, *cert_files)
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with open_daemon(config) as daemon, httpx.AsyncClient(verify=trusted, trust_env=False) as client:
        assert daemon.url.startswith("https://127.0.0.1:")
        body = text_webhook(text="rides", sender="250788000001", wamid="wamid.TLS1", timestamp=1700000000)
        r = await client.post(f"{daemon.url}/webhook", content=body,
                              headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)})
        assert r.status_code == 200
        assert r.headers["X-Routed-Service"] == "rides"
        [got] = await services.wait_for(1, "/rides")
        assert got.message["id"] == "wamid.TLS1"
        # A client that does not trust our CA is refused by its own verification: it is real TLS.
        async with httpx.AsyncClient(trust_env=False) as untrusting:
            with pytest.raises(httpx.ConnectError) as refused:
                await untrusting.get(f"{daemon.url}/health")
        assert "CERTIFICATE_VERIFY_FAILED" in repr(causes(refused.value))
        # And plain HTTP on the same port is not served.
        with pytest.raises(httpx.HTTPError):
            await client.get(daemon.url.replace("https://", "http://") + "/health")


def causes(error: BaseException | None) -> list[BaseException]:
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def encrypted_key(pem: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret")).decode()


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_check_server_tls_accepts_a_matching_pair(cert_files: tuple[str, str]) -> None:
    check_server_tls(*cert_files)


def test_check_server_tls_names_the_missing_or_unusable_file(tmp_path: Path, cert_files: tuple[str, str]) -> None:
    certfile, keyfile = cert_files
    cases = {
        (str(tmp_path / "nope.pem"), keyfile): f"server.certfile {tmp_path / 'nope.pem'}: No such file or directory",
        (certfile, str(tmp_path)): f"server.keyfile {tmp_path}: Is a directory",
        (write(tmp_path, "junk.pem", "not a certificate\n"), keyfile): "not a PEM certificate and its unencrypted",
        (certfile, write(tmp_path, "other.pem", trustme.CA().issue_cert("x").private_key_pem.bytes().decode())):
            "not a PEM certificate and its unencrypted private key (KEY_VALUES_MISMATCH)",
    }
    encrypted = trustme.CA().issue_cert("127.0.0.1")
    cases[(write(tmp_path, "enc-cert.pem", encrypted.cert_chain_pems[0].bytes().decode()),
           write(tmp_path, "enc-key.pem", encrypted_key(encrypted.private_key_pem.bytes())))] = \
        "unencrypted private key"  # and no password prompt on a terminal
    for (cert, key), message in cases.items():
        with pytest.raises(TLSError) as caught:
            check_server_tls(cert, key)
        assert message in str(caught.value)
        assert isinstance(caught.value, OSError)


async def test_a_missing_certificate_stops_run_daemon_before_it_starts(
    tmp_path: Path, services: Downstream, graph: Downstream, cert_files: tuple[str, str]
) -> None:
    config = tls_config(tmp_path, services, graph, str(tmp_path / "missing.pem"), cert_files[1])
    with pytest.raises(TLSError, match="server.certfile .*missing.pem: No such file or directory"):
        await run_daemon(config)
    assert not (tmp_path / "wacored.db").exists()  # nothing was started, not even the store


@pytest.fixture
def missing_cert_config(tmp_path: Path, services: Downstream, graph: Downstream, cert_files: tuple[str, str]) -> Path:
    """A config file whose certificate does not exist (its key does)."""
    data = config_mapping(tmp_path, services.url, graph.url,
                          server={"certfile": str(tmp_path / "missing.pem"), "keyfile": cert_files[1]})
    path = tmp_path / "wacored.toml"
    path.write_text(toml_text(data))
    return path


async def wacored_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([sys.executable, "-m", "wacored", *args], env=clean_env(), cwd=cwd,
                                  capture_stdout=True, capture_stderr=True, check=False)


async def test_wacored_run_with_a_missing_certificate_is_one_clear_line_and_exit_1(
    tmp_path: Path, missing_cert_config: Path
) -> None:
    result = await wacored_process("run", "-c", str(missing_cert_config), cwd=tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.decode().splitlines() if line.startswith("wacored:")]
    assert lines == [f"wacored: cannot run: server.certfile {tmp_path / 'missing.pem'}: No such file or directory"]
    assert "Traceback" not in result.stderr.decode()


async def test_check_config_warns_about_a_missing_certificate(tmp_path: Path, missing_cert_config: Path) -> None:
    result = await wacored_process("check-config", "-c", str(missing_cert_config), cwd=tmp_path)
    assert result.returncode == 0
    assert (f"warning: server.certfile {tmp_path / 'missing.pem'}: No such file or directory "
            "(`run` will refuse to start)") in result.stdout.decode()
