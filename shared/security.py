"""CurveZMQ for every headrace socket: key files, a ZAP allow-list, and failure counting.

With `[security] curve = true` every ROUTER (the broker, the learner's weight endpoint) is a
CURVE server and every DEALER a CURVE client: traffic is encrypted and the server knows the
client's public key. A per-process ZAP handler (pyzmq's `ThreadAuthenticator`, one per ZMQ
context, a thread so a busy event loop never stalls handshakes) admits only client keys found
in the allowed-clients directory. A peer that fails the handshake (unlisted key, plaintext,
wrong server key) never reaches the application: it is counted in
`headrace_auth_failures_total{server,reason}`, read from the socket's monitor events because
the ZAP handler never hears of a plaintext or undecryptable peer.

Key files use ZeroMQ's text certificate format (`zmq.auth.load_certificate` reads them):
`NAME.key` holds the public key, `NAME.key_secret` both keys and is written 0600.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from prometheus_client import Counter
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from shared.config import SecurityConfig

log = logging.getLogger(__name__)

AUTH_FAILURES = Counter(
    "headrace_auth_failures_total",
    "Peers refused during the CURVE handshake, by server and reason",
    ["server", "reason"],
)

SERVER_ROLES = ("broker", "learner")  # roles that bind a ROUTER
CLIENT_ROLES = ("learner", "actor", "cli")  # roles that connect to one
CLIENTS_SUBDIR = "clients"  # the allow-list: public keys only, safe to copy to servers


def role_of_key_name(name: str) -> str | None:
    """The role a client key stands for, from its file name in the allow-list: `learner`,
    `cli`, `actor`, or one of them followed by `-` and anything (`actor-3`). Keys of other
    names are admitted by the handshake but may send nothing (the broker refuses them)."""
    base = name.split("-", 1)[0]
    return base if base in CLIENT_ROLES else None


def client_names(allowed_dir: str | Path) -> dict[str, str]:
    """Public key (z85 text, as ZAP reports it in `User-Id`) -> the name of its file in the
    allow-list (`actor-3`): who holds it, as the operator named it."""
    out: dict[str, str] = {}
    for path in sorted(Path(allowed_dir).glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise SecurityError(f"[security] client key {path}: {e}") from None
        out[public.decode()] = path.stem
    return out


def client_roles(allowed_dir: str | Path) -> dict[str, str]:
    """Public key (z85 text) -> role, for the keys of the allow-list whose names name one."""
    names = client_names(allowed_dir).items()
    return {key: role for key, name in names if (role := role_of_key_name(name)) is not None}


class SecurityError(RuntimeError):
    """Keys are configured but missing or unreadable."""


LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    return host.startswith(LOOPBACK)


def bind_host_for(announced: str) -> str:
    """The interface a server binds for clients that dial `announced`: loopback when they
    reach it there (one machine), every interface otherwise (then `check_exposure` applies)."""
    return "127.0.0.1" if is_loopback(announced) else "0.0.0.0"


def check_exposure(sec: SecurityConfig, host: str, what: str) -> None:
    """Refuse a plaintext server on an interface beyond loopback unless `[security] insecure`
    says so: anyone who reaches such a port could publish policies, sample the replay or
    fetch the weights. One line, naming both ways out."""
    if sec.curve or sec.insecure or is_loopback(host):
        return
    raise SecurityError(
        f"{what} would bind {host} without [security] curve: anyone who reaches it could act as "
        "any role; set [security] curve = true (headrace keys generate), or insecure = true "
        "on a network you trust"
    )


@dataclass(frozen=True)
class CurveServer:
    """What a ROUTER needs: its key pair and whom to admit (`domain` keys the ZAP allow-list,
    so two servers in one process can admit different clients)."""

    public: bytes
    secret: bytes
    allowed_dir: str
    domain: str
    admit: tuple[str, ...] = CLIENT_ROLES  # roles whose keys pass the handshake


@dataclass(frozen=True)
class CurveClient:
    """What a DEALER needs: its key pair and the public key of the server it trusts."""

    public: bytes
    secret: bytes
    server_public: bytes


# ---------------------------------------------------------------- key files


def _key_path(sec: SecurityConfig, override: str, name: str) -> Path:
    return Path(override) if override else Path(sec.keys_dir) / name


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"[security] key file {path}: {e}") from None
    if need_secret and not secret:
        raise SecurityError(f"[security] {path} holds no secret key (want NAME.key_secret)")
    return public, secret


def server_keys(
    sec: SecurityConfig, role: str, admit: tuple[str, ...] = CLIENT_ROLES
) -> CurveServer | None:
    """Keys for `role`'s ROUTER ("broker" or "learner") admitting clients of the roles
    `admit`; None when curve is off."""
    if not sec.curve:
        return None
    public, secret = _load(_key_path(sec, sec.secret_key, f"{role}.key_secret"), True)
    allowed = _key_path(sec, sec.allowed_clients_dir, CLIENTS_SUBDIR)
    if not allowed.is_dir():
        raise SecurityError(f"[security] allowed clients directory {allowed} does not exist")
    assert secret is not None
    return CurveServer(public, secret, str(allowed), domain=role, admit=admit)


def client_keys(sec: SecurityConfig, role: str, server: str) -> CurveClient | None:
    """Keys for `role` connecting to `server` ("broker" or "learner"); None when curve is off."""
    if not sec.curve:
        return None
    public, secret = _load(_key_path(sec, sec.secret_key, f"{role}.key_secret"), True)
    override = {"broker": sec.broker_public_key, "learner": sec.learner_public_key}[server]
    server_public, _ = _load(_key_path(sec, override, f"{server}.key"), False)
    assert secret is not None
    return CurveClient(public, secret, server_public)


_BANNER = (
    "#   ****  Generated on {now} by `headrace keys generate`  ****\n"
    "#   ZeroMQ CURVE {kind} Certificate\n"
    "{warning}\n"
)


def _write_cert(path: Path, public: bytes, secret: bytes | None, force: bool) -> None:
    kind, warning = ("**Secret**", "#   Keep this file private: it is this peer's identity.\n")
    if secret is None:
        kind, warning = ("Public", "#   Exchange securely, or upload to a secure server.\n")
    now = datetime.datetime.now().isoformat(timespec="seconds")
    text = _BANNER.format(now=now, kind=kind, warning=warning)
    text += f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode()}"\n'
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    mode = 0o600 if secret is not None else 0o644
    # Created with its final mode (no window in which a secret is world-readable); chmod as
    # well because an existing file keeps its old mode and the umask may have narrowed ours.
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def generate_keys(
    directory: str | Path,
    servers: Iterable[str] = SERVER_ROLES,
    clients: Iterable[str] = CLIENT_ROLES,
    force: bool = False,
) -> list[Path]:
    """One key pair per role in `directory`, and the clients' public keys in `clients/`.

    Refuses to overwrite existing files unless `force` (replacing a key locks out every peer
    that still holds the old one). Returns the paths written.
    """
    root = Path(directory)
    allow = root / CLIENTS_SUBDIR
    allow.mkdir(parents=True, exist_ok=True)
    client_names = list(dict.fromkeys(clients))
    names = list(dict.fromkeys([*servers, *client_names]))
    if not force:
        files = [root / f"{n}{suffix}" for n in names for suffix in (".key", ".key_secret")]
        clash = [p for p in files if p.exists()]
        if clash:
            raise FileExistsError(f"{clash[0]} exists (pass --force to replace the keys)")
    written: list[Path] = []
    for name in names:
        public, secret = zmq.curve_keypair()
        for path, sec in ((root / f"{name}.key", None), (root / f"{name}.key_secret", secret)):
            _write_cert(path, public, sec, force=True)
            written.append(path)
        if name in client_names:
            _write_cert(allow / f"{name}.key", public, None, force=True)
            written.append(allow / f"{name}.key")
    return written


# ---------------------------------------------------------------- ZAP handler

_auth_lock = threading.Lock()
_authenticators: dict[int, ThreadAuthenticator] = {}


def _authenticator(ctx: zmq.Context) -> ThreadAuthenticator:
    """The ZAP handler of `ctx`, started on first use (libzmq asks whoever binds
    inproc://zeromq.zap.01 in the socket's context, so there is exactly one per context)."""
    with _auth_lock:
        auth = _authenticators.get(id(ctx))
        if auth is None:
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("headrace.zap"))
            auth.start()
            _authenticators[id(ctx)] = auth
        return auth


# ---------------------------------------------------------------- handshake failures

_PROTOCOL_REASONS: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "mechanism_mismatch",  # e.g. plaintext peer
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "cryptographic",  # e.g. wrong server key
}
_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _reason(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "unlisted_key"  # the ZAP handler said no (value: its status code, 400)
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return _PROTOCOL_REASONS.get(value, "protocol")
    return "handshake"


class HandshakeWatch:
    """Reads a socket's monitor events in a daemon thread and reports failed handshakes.

    A thread rather than an asyncio task: the transport classes have no lifecycle hook to run
    a task in, and counting must not depend on the owner's loop being responsive.
    """

    def __init__(self, sock: zmq.Socket, on_failure: Callable[[str], None]) -> None:
        self._sock = sock
        addr = f"inproc://headrace-monitor-{secrets.token_hex(8)}"
        sock.monitor(addr, _FAILED | zmq.EVENT_MONITOR_STOPPED)
        # A plain socket even in an asyncio context: it is read by blocking calls in a thread.
        mon = sock.context.socket(zmq.PAIR, socket_class=zmq.Socket)
        mon.connect(addr)
        self._thread = threading.Thread(
            target=self._run, args=(mon, on_failure), name="headrace-handshake", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _run(mon: zmq.Socket, on_failure: Callable[[str], None]) -> None:
        try:
            while True:
                ev = parse_monitor_message(mon.recv_multipart())
                if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                on_failure(_reason(ev["event"], ev["value"]))
        except zmq.ZMQError:  # context terminated under us: nothing left to watch
            return
        finally:
            mon.close(linger=0)

    def stop(self) -> None:
        try:
            self._sock.disable_monitor()  # sends EVENT_MONITOR_STOPPED, ending the thread
        except zmq.ZMQError:
            pass
        self._thread.join(timeout=1.0)


class _Throttle:
    """Log the first failure of each kind and then every 100th: a misconfigured client retries
    every few hundred ms and must not flood the log (the counter has the exact number)."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> bool:
        with self._lock:
            n = self._seen[key] = self._seen.get(key, 0) + 1
        return n % 100 == 1


def secure_server(sock: zmq.Socket, keys: CurveServer) -> HandshakeWatch:
    """Make the unbound ROUTER `sock` a CURVE server admitting `keys.allowed_dir`'s keys."""
    auth = _authenticator(sock.context)
    # Loaded once, here: adding a client key means restarting the server (or building a new
    # Server), which keeps the allow-list a plain, auditable directory.
    auth.configure_curve(domain=keys.domain, location=keys.allowed_dir)
    if keys.domain not in auth.certs:
        raise SecurityError(f"[security] cannot read client keys in {keys.allowed_dir}")
    roles = client_roles(keys.allowed_dir)
    auth.certs[keys.domain] = {
        k: v for k, v in auth.certs[keys.domain].items() if roles.get(k.decode()) in keys.admit
    }
    try:  # refuse everyone if the ZAP handler is missing (a draft option: best effort)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (zmq.ZMQError, AttributeError):
        pass
    sock.setsockopt(zmq.ZAP_DOMAIN, keys.domain.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    throttle = _Throttle()

    def failed(reason: str) -> None:
        AUTH_FAILURES.labels(server=keys.domain, reason=reason).inc()
        if throttle(reason):
            log.warning("%s: refused a peer's handshake (%s)", keys.domain, reason)

    return HandshakeWatch(sock, failed)


def secure_client(sock: zmq.Socket, keys: CurveClient, endpoint: str) -> HandshakeWatch:
    """Make the unconnected DEALER `sock` a CURVE client of the server `keys` trusts."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    throttle = _Throttle()

    def failed(reason: str) -> None:
        # Without this the only symptom of a wrong key would be requests timing out.
        if throttle(reason):
            log.warning(
                "handshake with %s failed (%s): check the [security] keys", endpoint, reason
            )

    return HandshakeWatch(sock, failed)
