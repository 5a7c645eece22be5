"""``edgebrain bench --device PROFILE=ssh://...`` against a real sshd on loopback.

The test starts /usr/sbin/sshd on a free port with a host key and a client key it generates,
writes a known_hosts for it (host key checking stays strict), and benchmarks an artifact on
"the device" with the TensorFlow-free runtime shipped as a zip. It fails, never skips, when
sshd is missing (apt-get install -y openssh-server).
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgebrain.bench import BenchOptions, SSHOptions, bench
from edgebrain.devices import SSHError, SSHTransport, parse_ssh_url

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgebrain-test", "-f", str(path)],
                   check=True)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not Path(SSHD).is_file():
        pytest.fail(f"{SSHD} is missing: install it (apt-get install -y openssh-server); the SSH device path "
                    "must be tested against a real sshd", pytrace=False)
    for tool in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (apt-get install -y openssh-client)", pytrace=False)
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    _keygen(d / "other_key")
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = _free_port()
    user = getpass.getuser()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        f"AllowUsers {user}\nSubsystem sftp internal-sftp\nLogLevel ERROR\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    check = subprocess.run([SSHD, "-t", "-f", str(d / "sshd_config")], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.fail(f"sshd rejects the test configuration: {check.stderr}", pytrace=False)
    log = open(d / "sshd.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}", pytrace=False)
            time.sleep(0.1)
    host_pub = " ".join((d / "host_key.pub").read_text().split()[:2])
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    other_pub = " ".join((d / "other_key.pub").read_text().split()[:2])
    (d / "wrong_known_hosts").write_text(f"[127.0.0.1]:{port} {other_pub}\n")
    yield {"dir": d, "port": port, "user": user, "url": f"ssh://{user}@127.0.0.1:{port}",
           "identity": str(d / "client_key"), "known_hosts": str(d / "known_hosts")}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def onnx_artifact(tiny_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX fp32 artifact of the tiny random model (plumbing only), from ``edgebrain convert``."""
    from edgebrain.convert import convert

    (art,) = convert(tiny_model, ["onnx"], ["fp32"], tmp_path_factory.mktemp("art"), data=data_dir, verify_n=8)
    return art.path


def _remote_dirs() -> set[str]:
    return set(glob.glob("/tmp/edgebrain-bench.*"))


def test_bench_over_ssh_runs_there_with_the_edge_runtime(sshd: dict[str, Any], onnx_artifact: Path,
                                                         data_dir: Path, tmp_path: Path) -> None:
    before = _remote_dirs()
    out = tmp_path / "out"
    doc = bench([onnx_artifact], data_dir, device=["host", f"rpi4={sshd['url']}"], out=out, per_class=3,
                no_reference=True,
                options=BenchOptions(threads=1, warmup=2, min_runs=10, min_seconds=0.2, throughput_min_runs=2,
                                     throughput_min_seconds=0.1),
                ssh=SSHOptions(identity=sshd["identity"], known_hosts=sshd["known_hosts"],
                               remote_python=sys.executable))
    assert doc["errors"] == []
    host, remote = sorted(doc["results"], key=lambda r: r["device"]["transport"] != "local")
    dev = remote["device"]
    assert dev["transport"] == sshd["url"] and dev["profile"] == "rpi4" and dev["label"] == "rpi4@127.0.0.1"
    # It really ran in the shipped zip, in the device's working folder, without TensorFlow.
    assert ".zip/edgebrain/remote.py" in dev["edgebrain_origin"] and dev["edgebrain_origin"].startswith("/tmp/edgebrain-bench.")
    assert dev["tensorflow_imported"] is False
    assert dev["fingerprint"]["cpu"] and dev["fingerprint"]["packages"]["onnxruntime"]
    # The rpi4 profile's facts contradict this x86 "device": recorded, not hidden.
    if dev["fingerprint"]["arch"] != "aarch64":
        assert any("arch aarch64" in w for w in dev["warnings"])
    # Same machine, same runtime: identical probabilities and figures.
    name = host["name"]
    np.testing.assert_allclose(doc["_probs"][f"{name}@host"], doc["_probs"][f"{name}@rpi4@127.0.0.1"], atol=1e-6)
    assert remote["accuracy"] == host["accuracy"] and remote["n"] == host["n"] == 12
    assert remote["latency_ms"]["n"] >= 10 and remote["cold_start_ms"] > 0 and remote["peak_rss_mb"] > 0
    assert _remote_dirs() == before  # the device's working folder was removed
    saved = json.loads((out / "results.json").read_text())
    assert {r["device"]["label"] for r in saved["results"]} == {"host", "rpi4@127.0.0.1"}
    assert "rpi4@127.0.0.1" in (out / "report.html").read_text()


def test_one_failing_artifact_on_the_device_keeps_the_others(sshd: dict[str, Any], onnx_artifact: Path,
                                                              data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    """A model the device cannot load (here: a consistent artifact whose model file is not ONNX)
    is reported as that artifact's error; the other artifact's results still come back. (The
    device's own profile prefers int8: the fp32 artifact's record says so.)"""
    from edgebrain.artifact import write_manifest
    from edgebrain.devices import load_profile

    prof = json.loads(Path(load_profile("rpi4").source).read_text())
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "ward-pi.json").write_text(json.dumps(
        {**prof, "name": "ward-pi", "precision": {"preferred": ["int8"]}}))
    monkeypatch.setenv("EDGEBRAIN_DEVICES", str(tmp_path / "profiles"))

    broken = tmp_path / "broken"
    shutil.copytree(onnx_artifact, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    m = json.loads((broken / "manifest.json").read_text())
    write_manifest(broken, {**{k: v for k, v in m.items() if k not in ("files", "artifact_sha256")},
                            "name": "broken"})
    doc = bench([onnx_artifact, broken], data_dir, device=[f"ward-pi={sshd['url']}"], out=tmp_path / "out",
                per_class=2, no_reference=True,
                options=BenchOptions(threads=1, warmup=1, min_runs=5, min_seconds=0.1, throughput_min_runs=2,
                                     throughput_min_seconds=0.1, job_timeout=300),
                ssh=SSHOptions(identity=sshd["identity"], known_hosts=sshd["known_hosts"],
                               remote_python=sys.executable))
    assert [r["name"] for r in doc["results"]] == [json.loads((onnx_artifact / "manifest.json").read_text())["name"]]
    assert doc["results"][0]["n"] == 8 and doc["results"][0]["device"]["label"] == "ward-pi@127.0.0.1"
    assert any("does not list fp32" in w for w in doc["results"][0]["warnings"])
    (err,) = doc["errors"]
    assert "broken" in json.dumps(err) and "ward-pi@127.0.0.1" in json.dumps(err)
    assert (tmp_path / "out" / "results.json").is_file()
    # the device's per-image progress came back live as plain lines
    assert re.search(r": 8/8 \(\d+ s\)", capfd.readouterr().err)


def test_unknown_host_key_is_an_error_not_a_prompt(sshd: dict[str, Any], onnx_artifact: Path, data_dir: Path,
                                                  tmp_path: Path) -> None:
    from edgebrain.cli import cli

    res = CliRunner().invoke(cli, [
        "bench", str(onnx_artifact), "--data", str(data_dir), "--out", str(tmp_path / "o"), "--per-class", "1",
        "--no-reference", "--device", sshd["url"], "--ssh-identity", sshd["identity"],
        "--ssh-known-hosts", str(sshd["dir"] / "wrong_known_hosts"), "--remote-python", sys.executable])
    assert res.exit_code != 0
    assert "host key verification failed" in res.output and "never turned off" in res.output
    assert not (tmp_path / "o").exists()


def test_wrong_key_is_refused_with_advice(sshd: dict[str, Any]) -> None:
    t = SSHTransport(parse_ssh_url(sshd["url"]), identity=sshd["dir"] / "other_key", known_hosts=sshd["known_hosts"])
    with pytest.raises(SSHError, match="Permission denied"):
        t.run("true")
    ok = SSHTransport(parse_ssh_url(sshd["url"]), identity=sshd["identity"], known_hosts=sshd["known_hosts"])
    assert ok.run("echo hi").strip() == "hi"


def test_proxy_jump_goes_through_the_jump_host_with_the_same_rules(sshd: dict[str, Any]) -> None:
    """ProxyJump through the loopback sshd to itself: works with the known key, and the hop to the
    jump host refuses an unknown host key too."""
    jump = f"ProxyJump={sshd['user']}@127.0.0.1:{sshd['port']}"
    ok = SSHTransport(parse_ssh_url(sshd["url"]), identity=sshd["identity"], known_hosts=sshd["known_hosts"],
                      options=[jump])
    assert ok.run("echo hi").strip() == "hi"
    bad = SSHTransport(parse_ssh_url(sshd["url"]), identity=sshd["identity"],
                       known_hosts=sshd["dir"] / "wrong_known_hosts", options=[jump])
    with pytest.raises(SSHError):
        bad.run("echo hi")
