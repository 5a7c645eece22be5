"""SSH transport for remote benchmarks: the system ``ssh`` / ``scp`` binaries, key auth only.

Every call passes ``-o BatchMode=yes`` (never prompts, so never a password) and
``-o StrictHostKeyChecking=yes`` (an unknown or changed host key is an error, never
accepted silently). A known_hosts file and an identity file may be given; options that
would weaken either rule are refused.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import EdgebrainError


class DeviceError(EdgebrainError):
    """A device profile or device address that cannot be used."""


class SSHError(DeviceError):
    """ssh/scp failed; the message says why and what to do."""


_USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9._:%-]+$")
# ``--ssh-option`` takes only options that cannot weaken host key checking or make authentication
# interactive (an allowlist: ssh has several ways to trust any key, e.g. KnownHostsCommand).
# Algorithm lists (a way to re-enable weak ones) and HostKeyAlias (checks the device against another
# host's key) are left out; ProxyJump is rewritten so that the jump hop follows the same rules.
_ALLOWED_OPTIONS = {
    "proxyjump", "serveraliveinterval", "serveralivecountmax", "tcpkeepalive", "compression",
    "connectionattempts", "addressfamily", "ipqos", "identityagent", "certificatefile",
    "preferredauthentications", "rekeylimit",
}
_OPTION_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9]*)\s*(?:=|\s)\s*(\S.*)$")


def check_ssh_option(opt: str) -> str:
    """Return ``Key=Value`` for an allowed ``--ssh-option``; DeviceError for anything else."""
    m = _OPTION_RE.match(opt)
    if not m:
        raise DeviceError(f"--ssh-option {opt!r}: expected Key=Value (e.g. ProxyJump=gw)")
    key, val = m.group(1), m.group(2).strip()
    if key.lower() not in _ALLOWED_OPTIONS:
        allowed = ", ".join(sorted(_ALLOWED_OPTIONS))
        raise DeviceError(f"--ssh-option {opt!r} is not allowed: host key checking stays strict and "
                          f"authentication stays non-interactive (keys only). Allowed options: {allowed}")
    if key.lower() == "proxyjump":
        _parse_jump(val)  # one hop, user@host[:port]
    if key.lower() == "preferredauthentications" and any(
            a.strip().lower() in ("password", "keyboard-interactive") for a in val.split(",")):
        raise DeviceError(f"--ssh-option {opt!r}: passwords are never used (key authentication only)")
    return f"{key}={val}"


def _parse_jump(val: str) -> tuple[str | None, str, int]:
    """``[user@]host[:port]`` of a ProxyJump hop (one hop; ssh:// URLs and chains are refused)."""
    if "," in val or "/" in val:
        raise DeviceError(f"--ssh-option ProxyJump={val}: one jump host, as [user@]host[:port]")
    user, _, hostport = val.rpartition("@")
    host, port = hostport, 22
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest:
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else -1
    elif hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        port = int(p) if p.isdigit() else -1
    if (user and not _USER_RE.match(user)) or not host or not _HOST_RE.match(host) or host.startswith("-") \
            or not 0 < port < 65536:
        raise DeviceError(f"--ssh-option ProxyJump={val}: expected [user@]host[:port]")
    return user or None, host, port


@dataclass(frozen=True)
class SSHAddress:
    user: str
    host: str
    port: int = 22

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    @property
    def scp_destination(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}"


def parse_ssh_url(url: str) -> SSHAddress:
    """``ssh://user@host[:port]`` -> SSHAddress. Passwords in the URL are refused."""
    parts = urlsplit(url)
    if parts.scheme != "ssh":
        raise DeviceError(f"{url!r}: expected ssh://user@host[:port]")
    if parts.password is not None:
        raise DeviceError(f"{url!r}: passwords are never taken or stored; use key authentication "
                          "(--ssh-identity KEY, or your ssh agent / ~/.ssh/config)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise DeviceError(f"{url!r}: expected ssh://user@host[:port] with nothing after the port")
    user, host = parts.username, parts.hostname
    if not user or not _USER_RE.match(user):
        raise DeviceError(f"{url!r}: a user name is required (ssh://user@host[:port])")
    if not host or not _HOST_RE.match(host) or host.startswith("-"):
        raise DeviceError(f"{url!r}: bad host name")
    try:
        port = parts.port or 22
    except ValueError as exc:
        raise DeviceError(f"{url!r}: bad port ({exc})") from exc
    return SSHAddress(user, host, int(port))


def _explain(stderr: str, addr: SSHAddress, known_hosts: str | None) -> str:
    s = stderr.strip()
    kh = known_hosts or "~/.ssh/known_hosts"
    if "Host key verification failed" in s or "REMOTE HOST IDENTIFICATION HAS CHANGED" in s or \
            "No ED25519 host key is known" in s or "host key for" in s.lower() and "not known" in s.lower():
        return (f"host key verification failed for {addr.url}: its host key is not in {kh}, or it changed. "
                f"Check the key's fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), "
                f"then add it: ssh-keyscan -p {addr.port} {addr.host} >> {kh}. Host key checking is never "
                "turned off.")
    if "Permission denied" in s:
        return (f"{addr.url}: key authentication was refused (Permission denied). Give the key with "
                "--ssh-identity, load it into ssh-agent, or add its .pub to the device's "
                "~/.ssh/authorized_keys. Passwords are never used.")
    if "Connection refused" in s:
        return f"{addr.url}: connection refused (is sshd running on port {addr.port}?)"
    if "timed out" in s or "Connection timed out" in s:
        return f"{addr.url}: connection timed out (address, port, firewall?)"
    if "Could not resolve hostname" in s:
        return f"{addr.url}: cannot resolve the host name {addr.host!r}"
    return f"{addr.url}: ssh failed: {s[-800:] or '(no message)'}"


class SSHTransport:
    """Run commands on, and copy files to/from, one device."""

    def __init__(self, address: SSHAddress, identity: str | Path | None = None,
                 known_hosts: str | Path | None = None, connect_timeout: int = 20,
                 options: Sequence[str] = ()) -> None:
        self.address = address
        self.identity = str(identity) if identity else None
        self.known_hosts = str(known_hosts) if known_hosts else None
        self.connect_timeout = int(connect_timeout)
        self.options = [check_ssh_option(opt) for opt in options]
        if self.identity and not Path(self.identity).is_file():
            raise DeviceError(f"--ssh-identity: no such file {self.identity}")
        if self.known_hosts and not Path(self.known_hosts).is_file():
            raise DeviceError(f"--ssh-known-hosts: no such file {self.known_hosts}")
        for tool in ("ssh", "scp"):
            if shutil.which(tool) is None:
                raise DeviceError(f"the {tool} client is not installed (apt-get install openssh-client)")

    def common_options(self, jump: bool = True) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={self.connect_timeout}", "-o", "LogLevel=ERROR"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if self.identity:
            opts += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        for o in self.options:
            key, _, val = o.partition("=")
            if key.lower() == "proxyjump":
                if jump:
                    opts += ["-o", self._proxy_command(val)]
                continue
            opts += ["-o", o]
        return opts

    def _proxy_command(self, jump: str) -> str:
        """ProxyJump as the equivalent ProxyCommand (``ssh -W``), so that the hop to the jump host
        runs with the same rules (batch mode, strict host keys, the same known_hosts and key);
        ssh's own ProxyJump starts that hop without them."""
        user, host, port = _parse_jump(jump)
        hop = ["ssh", *self.common_options(jump=False), "-p", str(port), "-W", "[%h]:%p", "--",
               f"{user}@{host}" if user else host]
        return "ProxyCommand=" + " ".join(shlex.quote(a) for a in hop)

    def ssh_argv(self, remote_command: str) -> list[str]:
        return ["ssh", *self.common_options(), "-p", str(self.address.port), "--",
                self.address.destination, remote_command]

    def run(self, remote_command: str, timeout: float | None = None, stream_stderr: bool = False) -> str:
        """Run a shell command on the device; return its stdout. Failures raise SSHError."""
        argv = self.ssh_argv(remote_command)
        if stream_stderr:
            rc, out, err = self._run_streaming(argv, timeout)
        else:
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise SSHError(f"{self.address.url}: remote command timed out after {timeout:.0f} s") from exc
            rc, out, err = proc.returncode, proc.stdout, proc.stderr or ""
        if rc == 255:
            raise SSHError(_explain(err, self.address, self.known_hosts))
        if rc != 0:
            raise SSHError(f"{self.address.url}: remote command failed (exit {rc}): "
                           f"{remote_command[:200]}\n{err.strip()[-1500:]}")
        return out

    def _run_streaming(self, argv: list[str], timeout: float | None) -> tuple[int, str, str]:
        """Run with the remote stderr shown live (progress lines) and kept for error messages."""
        import threading

        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, bufsize=1)
        tail: list[str] = []
        chunks: list[str] = []

        def pump_err() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                sys.stderr.write(line)
                sys.stderr.flush()
                tail.append(line)
                del tail[:-200]

        def pump_out() -> None:
            assert proc.stdout is not None
            chunks.append(proc.stdout.read())

        threads = [threading.Thread(target=pump_err, daemon=True), threading.Thread(target=pump_out, daemon=True)]
        for t in threads:
            t.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            raise SSHError(f"{self.address.url}: remote command timed out after {timeout:.0f} s") from exc
        for t in threads:
            t.join(5)
        return rc, "".join(chunks), "".join(tail)

    def _scp(self, args: list[str], timeout: float | None) -> None:
        argv = ["scp", "-q", "-p", *self.common_options(), "-P", str(self.address.port), "--", *args]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SSHError(f"{self.address.url}: copy timed out after {timeout:.0f} s") from exc
        if proc.returncode != 0:
            raise SSHError(_explain(proc.stderr or "", self.address, self.known_hosts)
                           if proc.returncode == 255 or "verification" in (proc.stderr or "")
                           else f"{self.address.url}: scp failed: {(proc.stderr or '').strip()[-800:]}")

    def put(self, local: Sequence[str | Path], remote_dir: str, timeout: float | None = None) -> None:
        self._scp([*(str(p) for p in local), f"{self.address.scp_destination}:{remote_dir}/"], timeout)

    def get(self, remote_path: str, local: str | Path, timeout: float | None = None) -> None:
        self._scp([f"{self.address.scp_destination}:{remote_path}", str(local)], timeout)

    def mkdtemp(self, prefix: str = "edgebrain-bench") -> str:
        out = self.run(f"mktemp -d {shlex.quote('/tmp/' + prefix + '.XXXXXXXX')}").strip()
        if not out.startswith("/tmp/"):
            raise SSHError(f"{self.address.url}: could not create a working folder (got {out!r})")
        return out

    def remove(self, remote_dir: str) -> None:
        if not remote_dir.startswith("/tmp/edgebrain-"):
            raise SSHError(f"refusing to delete {remote_dir!r} on the device (not an edgebrain working folder)")
        self.run(f"rm -rf -- {shlex.quote(remote_dir)}")
