"""Device profiles and ``--device`` parsing (no SSH needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgebrain.devices import (
    DeviceError,
    SSHTransport,
    compare_facts,
    list_profiles,
    load_profile,
    parse_device,
    parse_ssh_url,
)
from edgebrain.doctor import fingerprint

CLINIC = ("rpi4", "rpi5", "intel-nuc", "jetson-orin-nano", "old-pc")


def test_builtin_profiles_load_and_carry_options_and_facts() -> None:
    names = list_profiles()
    for n in ("host", *CLINIC):
        assert n in names
    for n in CLINIC:
        p = load_profile(n)
        assert p.name == n and not p.local
        assert p.facts and p.facts["cores"] > 0 and p.facts["arch"] in ("aarch64", "x86_64")
        assert p.facts["ram_mb"] >= 1024 and p.facts["isa"]
        assert p.threads and p.threads <= p.facts["cores"]
        assert p.runtime["openvino"]["performance_hint"] == "LATENCY"
    assert load_profile("rpi4").facts["int8_dot_product"] is False  # Cortex-A72: no asimddp
    assert "asimddp" in load_profile("rpi5").facts["isa"]
    assert "CUDAExecutionProvider" in load_profile("jetson-orin-nano").target_options("onnx")["providers"]
    host = load_profile("host")
    assert host.local and host.facts is None
    assert host.target_options("openvino") == {"device": "CPU", "performance_hint": "LATENCY"}  # nulls dropped


def test_device_values() -> None:
    assert parse_device("host").is_local
    d = parse_device("rpi5=ssh://pi@10.0.0.7:2222")
    assert d.profile.name == "rpi5" and d.address.port == 2222 and d.address.user == "pi"
    assert d.transport == "ssh://pi@10.0.0.7:2222" and d.label == "rpi5@10.0.0.7"
    d = parse_device("ssh://me@[::1]:22")
    assert d.profile.name == "ssh" and d.address.host == "::1" and d.address.scp_destination == "me@[::1]"
    with pytest.raises(DeviceError, match="ssh://user@host"):
        parse_device("rpi4")  # a remote profile needs an address: it never silently runs here
    with pytest.raises(DeviceError, match="unknown device profile"):
        parse_device("toaster")


def test_ssh_urls_refuse_passwords_and_junk() -> None:
    assert parse_ssh_url("ssh://pi@host").port == 22
    for bad, why in (("ssh://pi:secret@host", "passwords"), ("ssh://host", "user"), ("http://pi@host", "ssh://"),
                     ("ssh://pi@host/path", "nothing after"), ("ssh://pi@-oProxyCommand=x", "host")):
        with pytest.raises(DeviceError, match=why):
            parse_ssh_url(bad)


def test_ssh_options_cannot_weaken_host_key_checking() -> None:
    addr = parse_ssh_url("ssh://pi@127.0.0.1:2222")
    for opt in ("StrictHostKeyChecking=no", "stricthostkeychecking=accept-new", "UserKnownHostsFile=/dev/null",
                "UserKnownHostsFile /dev/null", "GlobalKnownHostsFile=/tmp/x", "BatchMode=no",
                "PasswordAuthentication=yes", "KnownHostsCommand=/usr/bin/ssh-keyscan -p %p %H",
                "KnownHostsCommand /usr/bin/ssh-keyscan %H", "VerifyHostKeyDNS=yes", "UpdateHostKeys=yes",
                "LocalCommand=x", "PreferredAuthentications=publickey,password", "ProxyJump", "=gw",
                "HostKeyAlias=other", "HostKeyAlgorithms=+ssh-rsa", "Ciphers=+3des-cbc",
                "ProxyCommand=nc %h %p", "ProxyJump=a,b", "ProxyJump=ssh://gw", "ProxyJump=-oX", "ProxyJump=gw:0"):
        with pytest.raises(DeviceError):
            SSHTransport(addr, options=[opt])
    t = SSHTransport(addr, options=["ProxyJump=admin@gw:2200", "ServerAliveInterval 15"])
    argv = t.ssh_argv("true")
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
    assert "ServerAliveInterval=15" in argv and not any(a.startswith("ProxyJump") for a in argv)
    # the hop to the jump host runs under the same rules (ssh's own ProxyJump would not)
    (proxy,) = [a for a in argv if a.startswith("ProxyCommand=")]
    assert "BatchMode=yes" in proxy and "StrictHostKeyChecking=yes" in proxy
    assert "-p 2200 -W '[%h]:%p' -- admin@gw" in proxy
    assert argv[argv.index("--") + 1] == "pi@127.0.0.1"


def test_user_profiles_are_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = json.loads(Path(load_profile("rpi5").source).read_text())
    good.update({"name": "ward-pi", "ssh": "ssh://pi@ward-pi.local"})
    (tmp_path / "ward-pi.json").write_text(json.dumps(good))
    bad = dict(good, name="bad", runtime={**good["runtime"], "treads": 4})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    bad2 = dict(good, name="bad2", runtime={**good["runtime"], "openvino": {"inference_precision": "int4"}})
    (tmp_path / "bad2.json").write_text(json.dumps(bad2))
    monkeypatch.setenv("EDGEBRAIN_DEVICES", str(tmp_path))
    d = parse_device("ward-pi")  # the profile's own address
    assert d.address.host == "ward-pi.local" and d.profile.source == str(tmp_path / "ward-pi.json")
    with pytest.raises(DeviceError, match="treads"):
        load_profile("bad")
    with pytest.raises(DeviceError, match="inference_precision"):
        load_profile("bad2")
    (tmp_path / "bad3.json").write_text(json.dumps(dict(good, name="bad3", precision={"preferred": ["int4"]})))
    with pytest.raises(DeviceError, match="precision.preferred"):
        load_profile("bad3")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DeviceError, match="not valid JSON"):
        load_profile(str(tmp_path / "broken.json"))


def test_facts_are_checked_against_the_device_fingerprint() -> None:
    fp = fingerprint()
    warns = compare_facts(load_profile("rpi4"), fp)
    if fp["arch"] != "aarch64":
        assert any("arch aarch64" in w for w in warns)
    host_like = load_profile("host")
    host_like.facts = {"arch": fp["arch"], "cores": fp["cores"], "isa": fp["isa"]}
    assert compare_facts(host_like, fp) == []
