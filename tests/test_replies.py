"""The reply corpus (tests/fixtures/replies/, see its README.md): SMTP replies that providers and MTAs document,
each labelled with the bounce category it means, served by a real MX to a real relay, whose verdict is read
from its delivery events and checked against /metrics.

The top-level files are the tune set; holdback/ is read only here, for a figure that is reported and never
asserted (and never itemised, so that nobody tunes on it). Entries marked `synthetic` are served like the
others but left out of every figure.
"""

from __future__ import annotations

import json
import re
import textwrap
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.outbound import FOREIGN, send, start_outbound, wait_until
from harness.prometheus import scrape

CORPUS = Path(__file__).parent / "fixtures" / "replies"
CATEGORIES = (
    "invalid-recipient", "invalid-domain", "mailbox-full", "message-too-large", "rate-limited", "greylisted",
    "reputation-block", "spam-content", "authentication-failure", "policy-block", "transient-network",
    "transient-other", "permanent-other",
)
REQUIRED = ("code", "enhanced", "text", "category", "source")
OPTIONAL = ("mx", "synthetic")
TUNE_ACCURACY = 0.97
BATCH = 50  # recipients per message: one transaction serves many entries
WRAP = 200  # long replies go out as multi-line replies, as the providers send them
FAILED = ("deferred", "bounced")


@dataclass(frozen=True)
class Entry:
    where: str  # "tune" or "holdback"
    file: str
    index: int
    code: int
    enhanced: str | None
    text: str
    category: str
    source: str
    mx: str | None
    synthetic: bool

    @property
    def label(self) -> str:
        return f"{self.file}[{self.index}]"

    def reply(self) -> str:
        """The reply the MX sends: the text wrapped into continuation lines, each with the enhanced code."""
        enh = f"{self.enhanced} " if self.enhanced else ""
        lines = textwrap.wrap(self.text, WRAP, break_long_words=False, break_on_hyphens=False) or [""]
        return "\r\n".join(f"{self.code}{'-' if i < len(lines) - 1 else ' '}{enh}{line}"
                           for i, line in enumerate(lines))


def corpus_files() -> list[tuple[str, Path]]:
    return ([("tune", p) for p in sorted(CORPUS.glob("*.yaml"))]
            + [("holdback", p) for p in sorted((CORPUS / "holdback").glob("*.yaml"))])


def entry_problems(e: object) -> list[str]:
    """What is wrong with one raw entry (empty: nothing)."""
    if not isinstance(e, dict):
        return [f"not a mapping: {e!r}"]
    out = [f"missing field {k!r}" for k in REQUIRED if k not in e]
    out += [f"unknown field {k!r}" for k in e if k not in REQUIRED + OPTIONAL]
    code, enh, text = e.get("code"), e.get("enhanced"), e.get("text")
    if not (isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599):
        out.append(f"code {code!r} is not a 4xx or 5xx integer")
    if enh is not None and not (isinstance(enh, str) and re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enh)):
        out.append(f"enhanced {enh!r} is neither null nor a class.subject.detail string")
    if not (isinstance(text, str) and text.strip() and text.isascii() and "\n" not in text and "\r" not in text):
        out.append(f"text {text!r} is not one non-empty ASCII line")
    if e.get("category") not in CATEGORIES:
        out.append(f"category {e.get('category')!r} is not one of {', '.join(CATEGORIES)}")
    src = e.get("source")
    if not (isinstance(src, str) and re.fullmatch(r"https://[^\s/]+\.[^\s/]+(/\S*)?", src)):
        out.append(f"source {src!r} is not an https URL")
    mx = e.get("mx")
    if mx is not None and not (isinstance(mx, str) and re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", mx)):
        out.append(f"mx {mx!r} is not a host name")
    if "synthetic" in e and e["synthetic"] is not True:
        out.append(f"synthetic is {e['synthetic']!r}; leave it out or say true")
    return out


def load() -> list[Entry]:
    out = []
    for where, path in corpus_files():
        raw = yaml.safe_load(path.read_text()) or []
        assert isinstance(raw, list), f"{path}: the file is not a list of entries"
        for i, e in enumerate(raw):
            bad = entry_problems(e)
            assert not bad, f"{path} entry {i}: {'; '.join(bad)}"
            name = f"{'holdback/' if where == 'holdback' else ''}{path.name}"
            out.append(Entry(where, name, i, e["code"], e["enhanced"], e["text"], e["category"], e["source"],
                             e.get("mx"), bool(e.get("synthetic"))))
    return out


def test_every_corpus_file_parses_and_every_entry_is_well_formed():
    files = corpus_files()
    assert files, f"no fixture files under {CORPUS}"
    problems, seen = [], {}
    for where, path in files:
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            problems.append(f"{path}: not YAML: {err}")
            continue
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            problems.append(f"{path}: not a list of entries")
            continue
        for i, e in enumerate(raw):
            problems += [f"{path.relative_to(CORPUS)}[{i}]: {p}" for p in entry_problems(e)]
            if isinstance(e, dict):
                key = (e.get("code"), e.get("enhanced"), e.get("text"))
                if key in seen:
                    problems.append(f"{path.relative_to(CORPUS)}[{i}]: the same reply as {seen[key]}")
                seen.setdefault(key, f"{path.relative_to(CORPUS)}[{i}]")
    assert not problems, "corpus problems:\n" + "\n".join(problems)

    entries = load()
    documented = [e for e in entries if not e.synthetic]
    held = [e for e in documented if e.where == "holdback"]
    assert len(documented) >= 300, f"only {len(documented)} documented entries"
    assert 0.2 <= len(held) / len(documented) <= 0.3, f"{len(held)} of {len(documented)} documented entries held back"
    tune_categories = {e.category for e in documented if e.where == "tune"}
    assert tune_categories == set(CATEGORIES), f"no documented tune entry for {set(CATEGORIES) - tune_categories}"


# ---------------------------------------------------------------------------------------------------------
# End to end


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if isinstance(ev, dict):
            out.append(ev)
    return out


def domain_for(mx: str | None) -> str:
    """The recipient domain served by an MX of that name; entries without one share corpus.test."""
    return f"{mx.replace('.', '-')}.corpus.test" if mx else "corpus.test"


def figures(entries: list[Entry], verdict: dict[Entry, str]) -> tuple[dict[str, tuple[int, float, float]], float, int]:
    """Per category (support, precision, recall), overall accuracy and the number scored; documented entries only."""
    scored = [e for e in entries if not e.synthetic]
    per = {}
    for c in CATEGORIES:
        truth = [e for e in scored if e.category == c]
        said = [e for e in scored if verdict.get(e) == c]
        hit = sum(1 for e in truth if verdict.get(e) == c)
        per[c] = (len(truth), hit / len(said) if said else float("nan"), hit / len(truth) if truth else float("nan"))
    right = sum(1 for e in scored if verdict.get(e) == e.category)
    return per, (right / len(scored) if scored else float("nan")), len(scored)


def report(entries: list[Entry], verdict: dict[Entry, str]) -> str:
    tune = [e for e in entries if e.where == "tune"]
    held = [e for e in entries if e.where == "holdback"]
    (tp, ta, tn), (hp, ha, hn) = figures(tune, verdict), figures(held, verdict)
    synthetic = sum(1 for e in entries if e.synthetic)
    lines = [f"reply corpus: {tn} documented tune entries, {hn} documented hold-back entries, "
             f"{synthetic} synthetic entries left out",
             f"{'category':<24}{'tune: n':>8}{'prec':>7}{'recall':>8}   {'hold-back: n':>12}{'prec':>7}{'recall':>8}"]
    for c in CATEGORIES:
        (n1, p1, r1), (n2, p2, r2) = tp[c], hp[c]
        lines.append(f"{c:<24}{n1:>8}{p1:>7.2f}{r1:>8.2f}   {n2:>12}{p2:>7.2f}{r2:>8.2f}")
    lines.append(f"{'accuracy':<24}{ta:>23.3f}   {ha:>27.3f}")
    return "\n".join(lines)


def tune_mistakes(entries: list[Entry], verdict: dict[Entry, str]) -> str:
    """The documented tune entries read wrongly (the hold-back set is never itemised)."""
    out = []
    for e in entries:
        if e.where == "tune" and not e.synthetic and verdict.get(e) != e.category:
            out.append(f"{e.label}: {e.code} {e.enhanced or '-'} {e.text[:100]!r} mx={e.mx or '-'}: "
                       f"want {e.category}, got {verdict.get(e)}")
    return "\n".join(out)


def test_the_relay_reads_the_documented_replies_as_the_corpus_labels_them(relays, dns, peers, mailbox, tmp_path,
                                                                         capsys):
    entries = load()
    mx = peers.aio(FOREIGN, "corpus-mx")
    tag = uuid.uuid4().hex[:8]
    address: dict[Entry, str] = {}
    for n, e in enumerate(entries):
        address[e] = f"c{n}-{tag}@{domain_for(e.mx)}"
        mx.on_rcpt(address[e], e.reply())
    for host in {e.mx for e in entries}:
        name = host or "mx1.corpus.test"
        dns.mx(domain_for(host), (10, name)).a(name, FOREIGN)

    events_file = tmp_path / "events.jsonl"

    def with_events(cfg: dict) -> None:
        cfg["events"] = {"file": str(events_file)}
        # This reads the classifier's verdicts: the back-off the shipped rules would apply to the providers'
        # push-back replies (a suspension of an hour) would only hold the rest of the corpus back.
        cfg["shaping"] = {"builtin_rules": False}

    relay = start_outbound(relays, dns, peers, name="corpus", config=with_events)
    by_rcpt = {a: e for e, a in address.items()}

    def verdicts() -> dict[str, dict]:
        got = {}
        for ev in read_events(events_file):
            r = ev.get("recipient")
            if r in by_rcpt and ev.get("type") in FAILED and r not in got:
                got[r] = ev
        return got

    def deliver(batch: list[Entry], per_message: int, timeout: float) -> None:
        by_domain = defaultdict(list)
        for e in batch:
            by_domain[domain_for(e.mx)].append(address[e])
        for rcpts in by_domain.values():
            for i in range(0, len(rcpts), per_message):
                send(relay, rcpts[i:i + per_message], tag="corpus")
        want = {address[e] for e in batch}
        wait_until(lambda: want <= verdicts().keys(), timeout, step=0.5)

    # A 421 closes the connection (the peer does as servers do), so each 421 goes alone and last: it takes no
    # other entry's transaction down with it.
    deliver([e for e in entries if e.code != 421], BATCH, 180)
    deliver([e for e in entries if e.code == 421], 1, 180)

    got = verdicts()
    missing = [f"{e.label} {address[e]}" for e in entries if address[e] not in got]
    assert not missing, (f"{len(missing)} entries got no deferred/bounced event: {missing[:20]}\n"
                         f"{relay.log_tail(60)}")
    unasked = [e.label for e in entries if not mx.rcpt_replies(address[e])]
    assert not unasked, f"the relay gave a verdict without asking the MX for: {unasked[:20]}"
    verdict = {e: got[address[e]].get("category") for e in entries}
    odd = [f"{e.label}: {verdict[e]!r}" for e in entries if verdict[e] not in CATEGORIES]
    assert not odd, f"events without one of the 13 categories: {odd[:20]}"

    # Every failed attempt is counted once in herald_bounces_total under the category its event carries.
    failures = [ev for ev in read_events(events_file) if ev.get("type") in FAILED and ev.get("recipient") in by_rcpt]
    counted = Counter(ev.get("category") for ev in failures)
    exp = scrape(relay)
    metric = {c: exp.total("herald_bounces_total", category=c) for c in CATEGORIES}
    assert {c: int(v) for c, v in metric.items() if v} == dict(counted), (
        f"herald_bounces_total by category {metric} does not add up to the events {dict(counted)}")

    text = report(entries, verdict)
    details = tmp_path / "replies-report.txt"
    details.write_text(text + "\n\nDocumented tune entries read wrongly:\n" + tune_mistakes(entries, verdict) + "\n")
    with capsys.disabled():
        print(f"\n{text}\n(tune-set mistakes itemised in {details})")

    _, tune_accuracy, _ = figures([e for e in entries if e.where == "tune"], verdict)
    assert tune_accuracy >= TUNE_ACCURACY, (
        f"tune-set accuracy {tune_accuracy:.3f} < {TUNE_ACCURACY}; the mistakes are listed in {details}")
