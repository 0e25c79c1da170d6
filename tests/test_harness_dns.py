"""The test DNS server itself (harness/dns.py): the delivery tests rely on it answering exactly as configured.

Checked with dnslib's client over UDP and TCP, and with `dig` where it is installed (an independent client).
No relay involved.
"""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
from dnslib import RCODE, DNSRecord


def ask(dns, name: str, qtype: str, tcp: bool = False, timeout: float = 2.0):
    """(rcode, truncated, [rdata as text]) or None on timeout."""
    q = DNSRecord.question(name, qtype)
    try:
        raw = q.send(dns.host, dns.port, tcp=tcp, timeout=timeout)
    except (socket.timeout, TimeoutError):
        return None
    r = DNSRecord.parse(raw)
    assert r.header.id == q.header.id
    return RCODE.get(r.header.rcode), bool(r.header.tc), [str(rr.rdata) for rr in r.rr]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_records_are_served_as_configured(dns, tcp):
    dns.mx("foreign.test", (20, "mx2.foreign.test"), (10, "mx1.foreign.test"))
    dns.a("mx1.foreign.test", "127.0.0.2", "127.0.0.3").aaaa("mx2.foreign.test", "::1")
    dns.txt("foreign.test", "v=spf1 -all")
    assert ask(dns, "foreign.test", "MX", tcp) == ("NOERROR", False, ["20 mx2.foreign.test.", "10 mx1.foreign.test."])
    assert ask(dns, "MX1.Foreign.Test", "A", tcp) == ("NOERROR", False, ["127.0.0.2", "127.0.0.3"])
    assert ask(dns, "mx2.foreign.test", "AAAA", tcp) == ("NOERROR", False, ["::1"])
    assert ask(dns, "foreign.test", "TXT", tcp) == ("NOERROR", False, ['"v=spf1 -all"'])


def test_null_mx_nodata_nxdomain_and_names_outside_the_zones(dns):
    dns.null_mx("null.test").a("implicit.test", "127.0.0.4")
    assert ask(dns, "null.test", "MX") == ("NOERROR", False, ["0 ."])
    assert ask(dns, "implicit.test", "MX") == ("NOERROR", False, [])  # NODATA: the name exists
    assert ask(dns, "nowhere.test", "MX") == ("NXDOMAIN", False, [])
    assert ask(dns, "example.com", "A") == ("REFUSED", False, [])


def test_servfail_drop_and_truncate_modes_and_healing(dns):
    dns.route("foreign.test", "127.0.0.2")
    dns.servfail("foreign.test")
    assert ask(dns, "foreign.test", "MX")[0] == "SERVFAIL"
    assert ask(dns, "mx1.foreign.test", "A")[0] == "SERVFAIL"  # names under a failing name fail too
    dns.heal("foreign.test").drop("foreign.test")
    assert ask(dns, "foreign.test", "MX", timeout=0.5) is None
    assert ask(dns, "foreign.test", "MX", tcp=True, timeout=0.5) is None
    dns.heal("foreign.test").truncate("foreign.test")
    assert ask(dns, "foreign.test", "MX") == ("NOERROR", True, [])
    assert ask(dns, "foreign.test", "MX", tcp=True) == ("NOERROR", False, ["10 mx1.foreign.test."])
    dns.heal("foreign.test")
    assert ask(dns, "foreign.test", "MX") == ("NOERROR", False, ["10 mx1.foreign.test."])
    kinds = [(q.transport, q.rcode) for q in dns.queries_for("foreign.test", "MX")]
    assert kinds == [("udp", "SERVFAIL"), ("udp", "DROPPED"), ("tcp", "DROPPED"), ("udp", "TRUNCATED"),
                     ("tcp", "NOERROR"), ("udp", "NOERROR")]


def test_records_can_change_while_the_server_runs(dns):
    dns.a("host.foreign.test", "127.0.0.2")
    assert ask(dns, "host.foreign.test", "A")[2] == ["127.0.0.2"]
    dns.remove("host.foreign.test").a("host.foreign.test", "127.0.0.5")
    assert ask(dns, "host.foreign.test", "A")[2] == ["127.0.0.5"]
    dns.remove("host.foreign.test")
    assert ask(dns, "host.foreign.test", "A")[0] == "NXDOMAIN"


def test_dig_sees_the_same_answers(dns):
    dig = shutil.which("dig")
    if not dig:
        pytest.skip("dig is not installed")
    dns.route("foreign.test", "127.0.0.2").null_mx("null.test")

    def run(*args):
        r = subprocess.run([dig, "@" + dns.host, "-p", str(dns.port), "+tries=1", "+time=2", *args],
                           capture_output=True, text=True, timeout=20)
        return r.stdout

    assert "10 mx1.foreign.test." in run("+short", "foreign.test", "MX")
    assert run("+short", "+tcp", "mx1.foreign.test", "A").strip() == "127.0.0.2"
    assert "0 ." in run("+short", "null.test", "MX")
    assert "status: NXDOMAIN" in run("nowhere.test", "MX")
    dns.servfail("foreign.test")
    assert "status: SERVFAIL" in run("foreign.test", "MX")
