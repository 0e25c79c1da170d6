"""A real DNS server on loopback for the delivery tests: UDP and TCP on one free 127.0.0.1 port.

The relay resolves MX and A/AAAA records through `delivery.dns.nameservers`; pointing that at this server lets a
test decide, per test and while the relay runs, what every name resolves to. `dnslib` packs and parses the
wire format; the serving loops are plain sockets in threads, so the failure modes the delivery spec names can
be produced exactly:

- records: MX (including the null MX `MX 0 .`), A, AAAA, TXT; answers are authoritative, TTL 0 by default so
  that a change made by the test is seen by the next look-up (no resolver cache in the way);
- a name inside a configured zone without records of the asked type: NOERROR/NODATA with the zone's SOA;
- a name inside a zone that does not exist: NXDOMAIN with the SOA; a name outside every zone: REFUSED;
- `servfail(name)`: SERVFAIL for that name and every name under it;
- `drop(name)`: never answers (UDP: no datagram back; TCP: the connection stays open, silent), for timeouts;
- `truncate(name)`: over UDP the answer comes back empty with TC=1, over TCP in full (TCP fallback);
- `stop()` and then `start()` again: the server goes away (nothing listens on its port) and comes back on
  the same port, with the same records, for an outage of the relay's only nameserver.

Every query is recorded (name, type, transport, rcode) for assertions. Every loop is bounded by the stop event
and socket timeouts; `stop()` joins the threads with a timeout.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

from .relay import free_port

POLL = 0.2  # seconds: how often the serving loops look at the stop event
TCP_IDLE = 10.0  # seconds a TCP client may stay idle before the server closes the connection
MAX_TCP_CLIENTS = 64


@dataclass
class Query:
    name: str  # lower case, no trailing dot
    qtype: str  # "MX", "A", ...
    transport: str  # "udp" | "tcp"
    rcode: str  # "NOERROR", "NXDOMAIN", "SERVFAIL", "REFUSED", "TRUNCATED" (UDP, TC=1) or "DROPPED"


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _under(name: str, parent: str) -> bool:
    return name == parent or name.endswith("." + parent)


class DnsServer:
    """Authoritative test DNS server. Configure with zone()/mx()/a()/...; change records at any time."""

    def __init__(self, host: str = "127.0.0.1", ttl: int = 0):
        self.host = host
        self.ttl = ttl
        self.port: int | None = None
        self._lock = threading.Lock()
        self._zones: set[str] = set()
        self._records: dict[str, list[RR]] = {}  # name -> RRs of any type
        self._servfail: set[str] = set()
        self._drop: set[str] = set()
        self._truncate: set[str] = set()
        self.queries: list[Query] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> "DnsServer":
        """Serve on a free port; after `stop()`, serve again on the same port (the relay's config names it)."""
        self._stop = threading.Event()
        self._threads = []
        for _ in range(50):
            port = self.port if self.port is not None else free_port(self.host)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                udp.bind((self.host, port))
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if self.port is not None:
                    raise RuntimeError(f"cannot serve again on {self.host}:{self.port}: it is taken")
                continue
            tcp.listen(MAX_TCP_CLIENTS)
            udp.settimeout(POLL)
            tcp.settimeout(POLL)
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        else:
            raise RuntimeError("no free port for the test DNS server (UDP and TCP)")
        for target in (self._serve_udp, self._serve_tcp):
            # Each generation of threads watches its own stop event, so a restart cannot revive an old one.
            t = threading.Thread(target=target, args=(self._stop,), name=f"dns-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Close both sockets: queries then go unanswered (UDP) or are refused (TCP) until `start()`."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()
        self._udp = self._tcp = None

    @property
    def address(self) -> str:
        """"127.0.0.1:PORT", the form `delivery.dns.nameservers` takes."""
        return f"{self.host}:{self.port}"

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- zone data -------------------------------------------------------------------------------------

    def zone(self, *names: str) -> "DnsServer":
        """Make this server authoritative for the zones: unknown names in them get NXDOMAIN."""
        with self._lock:
            self._zones.update(_norm(n) for n in names)
        return self

    def _add(self, name: str, rr: RR) -> None:
        name = _norm(name)
        with self._lock:
            if not any(_under(name, z) for z in self._zones):
                self._zones.add(name)  # a record outside every zone makes its own zone
            self._records.setdefault(name, []).append(rr)

    def mx(self, domain: str, *targets: tuple[int, str]) -> "DnsServer":
        """MX records, in the order given (the relay must sort by preference itself): mx(d, (10, "mx1.d"))."""
        for pref, host in targets:
            self._add(domain, RR(_norm(domain), QTYPE.MX, rdata=MX(_norm(host) + ".", pref), ttl=self.ttl))
        return self

    def null_mx(self, domain: str) -> "DnsServer":
        """RFC 7505 null MX: `MX 0 .`"""
        self._add(domain, RR(_norm(domain), QTYPE.MX, rdata=MX(".", 0), ttl=self.ttl))
        return self

    def a(self, name: str, *addresses: str) -> "DnsServer":
        for a in addresses:
            self._add(name, RR(_norm(name), QTYPE.A, rdata=A(a), ttl=self.ttl))
        return self

    def aaaa(self, name: str, *addresses: str) -> "DnsServer":
        for a in addresses:
            self._add(name, RR(_norm(name), QTYPE.AAAA, rdata=AAAA(a), ttl=self.ttl))
        return self

    def cname(self, name: str, target: str) -> "DnsServer":
        """An alias; answered to CNAME queries only (nothing here chases it)."""
        self._add(name, RR(_norm(name), QTYPE.CNAME, rdata=CNAME(_norm(target) + "."), ttl=self.ttl))
        return self

    def txt(self, name: str, *strings: str) -> "DnsServer":
        """One TXT record made of the given character-strings."""
        self._add(name, RR(_norm(name), QTYPE.TXT, rdata=TXT(list(strings)), ttl=self.ttl))
        return self

    def route(self, domain: str, *hosts: str, pref_step: int = 10) -> "DnsServer":
        """MX records for domain: mx1.<domain> (preference 10) -> hosts[0], mx2 (20) -> hosts[1], ..."""
        for i, h in enumerate(hosts, 1):
            self.mx(domain, (i * pref_step, f"mx{i}.{domain}")).a(f"mx{i}.{domain}", h)
        return self

    def remove(self, name: str, qtype: str | None = None) -> "DnsServer":
        """Delete the records of a name (all, or those of one type); the name then gets NODATA/NXDOMAIN."""
        name = _norm(name)
        with self._lock:
            if qtype is None:
                self._records.pop(name, None)
            else:
                t = getattr(QTYPE, qtype)
                self._records[name] = [r for r in self._records.get(name, []) if r.rtype != t]
        return self

    def servfail(self, name: str) -> "DnsServer":
        with self._lock:
            self._servfail.add(_norm(name))
        return self

    def drop(self, name: str) -> "DnsServer":
        with self._lock:
            self._drop.add(_norm(name))
        return self

    def truncate(self, name: str) -> "DnsServer":
        with self._lock:
            self._truncate.add(_norm(name))
        return self

    def heal(self, name: str) -> "DnsServer":
        """Undo servfail/drop/truncate for a name."""
        name = _norm(name)
        with self._lock:
            self._servfail.discard(name)
            self._drop.discard(name)
            self._truncate.discard(name)
        return self

    def queries_for(self, name: str, qtype: str | None = None) -> list[Query]:
        name = _norm(name)
        with self._lock:
            return [q for q in self.queries if q.name == name and (qtype is None or q.qtype == qtype)]

    # -- answering -------------------------------------------------------------------------------------

    def answer(self, data: bytes, transport: str) -> bytes | None:
        """The reply to one query message, or None for no reply at all (malformed or dropped)."""
        try:
            req = DNSRecord.parse(data)
        except Exception:  # malformed: a real server would drop it too
            return None
        if not req.questions:
            return None
        q = req.questions[0]
        name = _norm(str(q.qname))
        qtype = QTYPE.get(q.qtype, str(q.qtype))
        reply = req.reply()  # same id and question, QR=1, AA=1, RA=1
        reply.header.rd = req.header.rd
        with self._lock:
            if any(_under(name, d) for d in self._drop):
                self.queries.append(Query(name, qtype, transport, "DROPPED"))
                return None
            zone = max((z for z in self._zones if _under(name, z)), key=len, default=None)
            if any(_under(name, f) for f in self._servfail):
                rcode = RCODE.SERVFAIL
            elif zone is None:
                rcode = RCODE.REFUSED
                reply.header.aa = 0
            elif transport == "udp" and any(_under(name, t) for t in self._truncate):
                reply.header.tc = 1
                self.queries.append(Query(name, qtype, transport, "TRUNCATED"))
                return reply.pack()
            else:
                rrs = self._records.get(name, [])
                exists = bool(rrs) or name == zone or any(n.endswith("." + name) for n in self._records)
                if not exists:
                    rcode = RCODE.NXDOMAIN
                else:
                    rcode = RCODE.NOERROR
                    for rr in rrs:
                        if q.qtype == QTYPE.ANY or rr.rtype == q.qtype:
                            reply.add_answer(rr)
                if not reply.rr:  # NXDOMAIN or NODATA: the SOA lets the resolver tell them apart
                    reply.add_auth(RR(zone, QTYPE.SOA, ttl=self.ttl, rdata=SOA(
                        f"ns.{zone}.", f"hostmaster.{zone}.", (1, 60, 60, 600, self.ttl))))
            reply.header.rcode = rcode
            self.queries.append(Query(name, qtype, transport, RCODE.get(rcode)))
        return reply.pack()

    def _serve_udp(self, stop: threading.Event) -> None:
        udp = self._udp
        assert udp is not None
        while not stop.is_set():
            try:
                data, peer = udp.recvfrom(65535)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            out = self.answer(data, "udp")
            if out is not None:
                try:
                    udp.sendto(out, peer)
                except OSError:
                    pass

    def _serve_tcp(self, stop: threading.Event) -> None:
        tcp = self._tcp
        assert tcp is not None
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            t = threading.Thread(target=self._tcp_client, args=(conn, stop), daemon=True)
            t.start()

    def _tcp_client(self, conn: socket.socket, stop: threading.Event) -> None:
        conn.settimeout(POLL)
        buf = b""
        idle_since = time.monotonic()
        with conn:
            while not stop.is_set() and time.monotonic() - idle_since < TCP_IDLE:
                try:
                    chunk = conn.recv(65535)
                except (socket.timeout, TimeoutError):
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                idle_since = time.monotonic()
                buf += chunk
                while len(buf) >= 2:
                    (length,) = struct.unpack("!H", buf[:2])
                    if len(buf) < 2 + length:
                        break
                    msg, buf = buf[2:2 + length], buf[2 + length:]
                    out = self.answer(msg, "tcp")
                    if out is not None:
                        try:
                            conn.sendall(struct.pack("!H", len(out)) + out)
                        except OSError:
                            return
