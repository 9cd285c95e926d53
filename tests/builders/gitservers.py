"""Real git servers on 127.0.0.1 for transport tests: smart HTTP(S) and OpenSSH.

* :class:`SmartHttpServer` runs the real ``git http-backend`` (CGI) for every request
  behind a small threaded HTTP server that demands HTTP basic auth with one token;
  with an :class:`ssl.SSLContext` it serves HTTPS instead.
* :class:`TestCA` makes a throw-away CA and a server certificate for 127.0.0.1
  (cryptography), so HTTPS trust can be granted or withheld per test.
* :class:`SshServer` runs the real ``/usr/sbin/sshd -D -e`` with its own config, host
  key and ``authorized_keys`` in a temp dir; :class:`SshAgent` a real ``ssh-agent -D``.

Every process is started on a random free port and stopped by its pid.
"""

from __future__ import annotations

import base64
import datetime
import hmac
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SSHD = "/usr/sbin/sshd"
_HTTP_BACKEND = ("git", "http-backend")


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def short_tmpdir(prefix: str) -> Path:
    """A private dir under /tmp: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o700)
    return path


# --- smart HTTP ------------------------------------------------------------------------


class _GitHandler(BaseHTTPRequestHandler):
    server: _GitHttpd

    def log_message(self, format: str, *args: object) -> None:
        self.server.requests.append(format % args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            _user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), self.server.token.encode())

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        if not self._authorised():
            self.server.denied += 1
            body = b"authentication required\n"
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = self._body()
        parts = urlsplit(self.path)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "HOME": str(self.server.root),
            "REQUEST_METHOD": self.command,
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "bstore",
            "REMOTE_ADDR": "127.0.0.1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        proc = subprocess.run(list(_HTTP_BACKEND), input=body, env=env, capture_output=True,
                              timeout=60, check=False)
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = proc.stdout.partition(b"\n\n")
        status = 200
        headers: list[tuple[str, str]] = []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _GitHttpd(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    token: str
    requests: list[str]
    denied: int


class SmartHttpServer:
    """``git http-backend`` for the bare repos under ``root``, basic auth with ``token``.

    With ``tls`` (a server-side context) the URLs are ``https://``.
    """

    def __init__(self, root: Path, token: str, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = _GitHttpd(("127.0.0.1", 0), _GitHandler)
        self.httpd.root = root
        self.httpd.token = token
        self.httpd.requests = []
        self.httpd.denied = 0
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, repo: str, userinfo: str = "") -> str:
        """The URL of the bare repo ``root/<repo>``."""
        at = f"{userinfo}@" if userinfo else ""
        return f"{self.scheme}://{at}127.0.0.1:{self.port}/{repo}"

    @property
    def requests(self) -> list[str]:
        """The request log lines (to check that no credential reached a log)."""
        return self.httpd.requests

    @property
    def denied(self) -> int:
        """How many requests were answered 401."""
        return self.httpd.denied

    def __enter__(self) -> SmartHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)


class TestCA:
    """A CA (EC P-256) and a certificate it signed for 127.0.0.1, written as PEM files."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "bstore test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ca_cert = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
            ]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        self.cert_file = directory / "server.pem"
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_file = directory / "server.key"
        self.key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))

    def server_context(self) -> ssl.SSLContext:
        """A server-side TLS context presenting the 127.0.0.1 certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


# --- OpenSSH ---------------------------------------------------------------------------


def have_sshd() -> bool:
    """Whether the OpenSSH server binary is installed."""
    return os.access(SSHD, os.X_OK) and shutil.which("ssh-keygen") is not None


def make_key(path: Path, passphrase: str = "", kind: str = "ed25519") -> Path:
    """A new key pair at ``path`` / ``path.pub`` made with the real ``ssh-keygen``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", path.name,
                    "-f", str(path)], check=True, capture_output=True, timeout=30)
    return path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class SshServer:
    """A real sshd on 127.0.0.1:<free port> letting ``authorized`` keys log in as
    the current user (root in CI), so ``ssh://USER@127.0.0.1:PORT/abs/path.git`` works."""

    def __init__(self, directory: Path, authorized: list[Path]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.host_key = make_key(directory / "host_ed25519")
        keys = directory / "authorized_keys"
        keys.write_text("".join(Path(f"{k}.pub").read_text() for k in authorized))
        keys.chmod(0o600)
        self.log = directory / "sshd.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self, port: int) -> Path:
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"PidFile {self.dir / 'sshd.pid'}\nAuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nMaxAuthTries 10\nLogLevel VERBOSE\n"
            "AllowAgentForwarding no\nAllowTcpForwarding no\nX11Forwarding no\n"
            f"AllowUsers {self.user}\n"
        )
        return config

    def known_hosts_line(self) -> str:
        """The ``known_hosts`` line naming this server's host key at its port."""
        kind, blob = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def url(self, repo: Path) -> str:
        """The ssh:// URL of the bare repository at the absolute path ``repo``."""
        return f"ssh://{self.user}@127.0.0.1:{self.port}{repo}"

    def start(self) -> SshServer:
        """Start sshd in the foreground, retrying on a port lost to a race."""
        if os.getuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        for _attempt in range(5):
            port = free_port()
            log = self.log.open("ab")
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self._config(port))],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            log.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                        if sock.recv(64).startswith(b"SSH-2.0"):
                            self.port, self.proc = port, proc
                            return self
                except OSError:
                    time.sleep(0.05)
            _stop(proc)
        raise RuntimeError(f"sshd did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop sshd by its pid."""
        if self.proc is not None:
            _stop(self.proc)

    def __enter__(self) -> SshServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class SshAgent:
    """A real ``ssh-agent -D -a <sock>`` holding the keys given to :meth:`add`."""

    def __init__(self) -> None:
        self.dir = short_tmpdir("bsa-")
        self.socket = self.dir / "agent.sock"
        self.proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(self.socket)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("ssh-agent did not create its socket")
            time.sleep(0.02)

    def add(self, key: Path) -> None:
        """``ssh-add`` an unencrypted private key."""
        subprocess.run(["ssh-add", str(key)], check=True, capture_output=True, timeout=30,
                       env={**os.environ, "SSH_AUTH_SOCK": str(self.socket)})

    def close(self) -> None:
        """Stop the agent by its pid and remove its socket dir."""
        _stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)
