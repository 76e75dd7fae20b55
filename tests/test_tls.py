"""TLS both ways: serving HTTPS directly from ``[server] certfile``/``keyfile``, and forwarding to
services over HTTPS trusting the system store, certifi's bundle and a service's ``ca_file``. A real
daemon, real HTTPS servers, trustme CAs."""

from __future__ import annotations

import ssl
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trustme

from wacored.actors.forwarder import Target, attempt, new_transport, tls_context
from wacored.config import Config, ForwardingConfig
from wacored.core.delivery import Verdict
from wacored.core.whatsapp import sign, text_webhook
from wacored.daemon import run_daemon
from wacored.http.tls import TLSError, check_server_tls

from .conftest import SECRET, Downstream, config_mapping, open_daemon, rows
from .support import clean_env, make_delivery, toml_text


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
        r = await client.post(
            f"{daemon.url}/webhook",
            content=body,
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET, body)},
        )
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
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")
    ).decode()


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
        (
            certfile,
            write(tmp_path, "other.pem", trustme.CA().issue_cert("x").private_key_pem.bytes().decode()),
        ): "not a PEM certificate and its unencrypted private key (KEY_VALUES_MISMATCH)",
    }
    encrypted = trustme.CA().issue_cert("127.0.0.1")
    cases[
        (
            write(tmp_path, "enc-cert.pem", encrypted.cert_chain_pems[0].bytes().decode()),
            write(tmp_path, "enc-key.pem", encrypted_key(encrypted.private_key_pem.bytes())),
        )
    ] = "unencrypted private key"  # and no password prompt on a terminal
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
    data = config_mapping(
        tmp_path, services.url, graph.url, server={"certfile": str(tmp_path / "missing.pem"), "keyfile": cert_files[1]}
    )
    path = tmp_path / "wacored.toml"
    path.write_text(toml_text(data))
    return path


async def wacored_process(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "wacored", *args],
        env=clean_env(),
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


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
    assert (
        f"warning: server.certfile {tmp_path / 'missing.pem'}: No such file or directory (`run` will refuse to start)"
    ) in result.stdout.decode()


# --- TLS to downstream services -------------------------------------------------------------------


async def https_downstream(nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path) -> Downstream:
    """A downstream serving HTTPS with a certificate of the private CA `ca`."""
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "down.pem", tmp_path / "down.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    downstream = Downstream()
    hc = hypercorn.config.Config()
    hc.bind = ["127.0.0.1:0"]
    hc.certfile, hc.keyfile = str(certfile), str(keyfile)
    hc.accesslog = None
    hc.graceful_timeout = 0.5
    urls = await nursery.start(partial(hypercorn.trio.serve, downstream.app, hc))
    downstream.url = urls[0]
    return downstream


async def test_a_service_behind_a_private_ca_is_trusted_with_its_ca_file(
    tmp_path: Path, graph: Downstream, ca: trustme.CA, nursery: trio.Nursery
) -> None:
    secure = await https_downstream(nursery, ca, tmp_path)
    assert secure.url.startswith("https://")
    ca_file = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    data = config_mapping(tmp_path, secure.url, graph.url, forwarding={"retries": 0, "timeout_ms": 2000})
    data["services"]["rides"]["ca_file"] = str(ca_file)  # jobs: no ca_file, so its certificate is unknown
    db = tmp_path / "wacored.db"
    async with open_daemon(Config.from_mapping(data, {})) as daemon:
        assert (await daemon.send_text("rides")).status_code == 200
        assert (await daemon.send_text("jobs", sender="250788000002")).status_code == 200
        [got] = await secure.wait_for(1, "/rides")
        assert got.message["text"]["body"] == "rides"
        with trio.fail_after(10):
            while not rows(db, "SELECT error FROM dead_letters"):  # noqa: ASYNC110 -- the state is in the file
                await trio.sleep(0.02)
    [(error,)] = rows(db, "SELECT error FROM dead_letters")
    assert "TLS handshake" in error  # the service without the CA is refused by verification


async def test_the_system_trust_store_is_used_for_services(
    tmp_path: Path, ca: trustme.CA, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL's default paths (on Debian /etc/ssl/certs; here pointed at a file with SSL_CERT_FILE, as
    an operator's `update-ca-certificates` would add a company CA) are trusted, not only certifi's."""
    secure = await https_downstream(nursery, ca, tmp_path)
    system = tmp_path / "system-ca.pem"
    ca.cert_pem.write_to_path(str(system))
    monkeypatch.setenv("SSL_CERT_FILE", str(system))
    tls_context.cache_clear()
    try:
        target = Target(name="rides", url=f"{secure.url}/rides", forwarding=ForwardingConfig(timeout_ms=2000))
        async with new_transport() as transport:
            result = await attempt(transport, target, make_delivery())
    finally:
        tls_context.cache_clear()
    assert result.verdict is Verdict.DELIVERED, result.error


def test_check_config_warns_about_an_unreadable_ca_file(tmp_path: Path) -> None:
    data = config_mapping(tmp_path, "https://127.0.0.1:9", "http://127.0.0.1:9")
    data["services"]["rides"]["ca_file"] = str(tmp_path / "missing.pem")
    (tmp_path / "wacored.toml").write_text(toml_text(data))
    result = subprocess.run(
        [sys.executable, "-m", "wacored", "check-config", "-c", str(tmp_path / "wacored.toml")],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert (
        f"warning: services.rides.ca_file {tmp_path / 'missing.pem'}: not a readable PEM CA certificate"
        in result.stdout
    )
