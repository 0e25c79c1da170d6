"""The project's own documentation (`docs/`, the top README) against what the code does.

- docs/metrics.md against a real relay's `/metrics`, sharing its suppressions through a store, after traffic
  that gives every family a series (test_metrics.relay_with_every_series): every `herald_*` family the relay exports is documented, every
  relay metric the page documents is exported, with the documented type and label names, and every label
  value the relay exports is in the value table the page gives for that label (labels without a table, such
  as `domain`, are open). Families under the page's "Operator metrics" heading are the operator's and are
  not looked for in the relay's output.
- docs/metrics.md against the Grafana dashboard and the alerts of the Helm chart: every panel and alert
  that reads a metric is named in that metric's "Used by" line, and every panel and alert named there reads
  it.
- docs/operations.md has a subsection for every alert of the chart.
- Every relative link in README.md and docs/*.md points to a file that exists and, with an anchor, to a
  heading of that file.

The page's shape this relies on: one `### \\`herald_name\\`` heading per metric, with bullets "- Type:",
"- Labels:" and "- Used by:" (panel titles in double quotes, alerts in backticks), and, for a label with a
closed set of values, a table whose first header cell is the label in backticks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.prometheus import scrape
from harness.relay import REPO
from test_metrics import relay_with_every_series

DOCS = REPO / "docs"
METRICS_MD = DOCS / "metrics.md"
OPERATIONS_MD = DOCS / "operations.md"
DASHBOARD = REPO / "charts" / "herald" / "dashboards" / "herald.json"
ALERT_RULES = REPO / "charts" / "herald" / "templates" / "prometheusrule.yaml"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# ---------------------------------------------------------------------------------------------------------
# Reading docs/metrics.md


@dataclass
class DocumentedMetric:
    name: str
    operator: bool
    type: str | None = None
    labels: set[str] | None = None
    used_by: str = ""
    # label -> the closed set of values its table lists
    values: dict[str, set[str]] = field(default_factory=dict)


def _bullet(lines: list[str], start: int) -> str:
    """A bullet's text with its continuation lines joined."""
    out = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  ") or line.lstrip().startswith("- "):
            break
        out.append(line.strip())
    return " ".join(out)


def _tables(lines: list[str]) -> list[list[list[str]]]:
    """The Markdown tables among `lines`, each as rows of cells (header first, separator row dropped)."""
    tables, current = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append([r for i, r in enumerate(current) if i != 1])
            current = []
    return tables


def documented_metrics() -> dict[str, DocumentedMetric]:
    lines = METRICS_MD.read_text().splitlines()
    metrics: dict[str, DocumentedMetric] = {}
    section = ""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line.startswith("## "):
            section, current = line[3:].strip(), None
            continue
        m = re.match(r"^### `(herald_[a-z0-9_]+)`\s*$", line)
        if m:
            assert m.group(1) not in metrics, f"docs/metrics.md documents {m.group(1)} twice"
            current = DocumentedMetric(m.group(1), operator=section.lower().startswith("operator"))
            metrics[current.name] = current
            bodies[current.name] = []
            continue
        if line.startswith("### "):
            current = None
        if current is not None:
            bodies[current.name].append(line)
    for name, body in bodies.items():
        metric = metrics[name]
        for i, line in enumerate(body):
            if line.startswith("- Type:"):
                metric.type = line.split(":", 1)[1].strip()
            elif line.startswith("- Labels:"):
                text = _bullet(body, i).split(":", 1)[1]
                metric.labels = set(re.findall(r"`([a-z_]+)`", text))
            elif line.startswith("- Used by:"):
                metric.used_by = _bullet(body, i)
        for table in _tables(body):
            m = re.fullmatch(r"`([a-z_]+)`", table[0][0])
            if m and m.group(1) in (metric.labels or set()):
                metric.values[m.group(1)] = {re.sub(r"^`|`$", "", row[0]) for row in table[1:]}
        assert metric.type in ("counter", "gauge", "histogram"), f"{name}: no '- Type:' line (counter, gauge, histogram)"
        assert metric.labels is not None, f"{name}: no '- Labels:' line"
        assert metric.used_by, f"{name}: no '- Used by:' line"
    return metrics


# ---------------------------------------------------------------------------------------------------------
# The relay's /metrics against the page


def family_of(sample_name: str, types: dict[str, str]) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and types.get(base) == "histogram":
            return base
    return sample_name


def test_every_relay_metric_is_documented_and_every_documented_one_is_exported(relays, dns, peers, store):
    doc = documented_metrics()
    relay, refreshed = relay_with_every_series(relays, dns, peers, "documented", store=store)
    exp = scrape(relay)
    assert refreshed, f"the queue gauges never showed the deferred message:\n{exp.text}"
    exported = {n for n in exp.types if n.startswith("herald_")}
    relay_doc = {n for n, m in doc.items() if not m.operator}

    undocumented = sorted(exported - set(doc))
    assert not undocumented, f"the relay exports families docs/metrics.md does not document: {undocumented}"
    operator_in_relay = sorted(exported & {n for n, m in doc.items() if m.operator})
    assert not operator_in_relay, f"documented as operator metrics but exported by the relay: {operator_in_relay}"
    missing = sorted(relay_doc - exported)
    assert not missing, (f"docs/metrics.md documents relay metrics the relay does not export: {missing}\n"
                         f"exported: {sorted(exported)}")

    wrong_type = {n: (doc[n].type, exp.types[n]) for n in relay_doc if doc[n].type != exp.types[n]}
    assert not wrong_type, f"type in docs/metrics.md vs the relay's # TYPE: {wrong_type}"
    problems = []
    for s in exp.samples:
        name = family_of(s.name, exp.types)
        if name not in doc:
            continue
        labels = dict(s.labels)
        labels.pop("le", None)
        if set(labels) != doc[name].labels:
            problems.append(f"{s.name}{labels}: labels {sorted(labels)}, documented {sorted(doc[name].labels)}")
            continue
        for label, value in labels.items():
            allowed = doc[name].values.get(label)
            if allowed is not None and value not in allowed:
                problems.append(f"{s.name}: {label}={value!r} is not in the documented values {sorted(allowed)}")
    assert not problems, "the relay's series differ from docs/metrics.md:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# The dashboard and the alerts against the "Used by" lines


def herald_names(expr: str, known: set[str]) -> set[str]:
    out = set()
    for n in re.findall(r"\bherald_[a-z0-9_]+", expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if n.endswith(suffix) and n.removesuffix(suffix) in known:
                n = n.removesuffix(suffix)
        out.add(n)
    return out


def readers(known: set[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """metric -> titles of the panels that read it, metric -> names of the alerts that read it."""
    panels: dict[str, set[str]] = {}
    dashboard = json.loads(DASHBOARD.read_text())
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            for n in herald_names(t["expr"], known):
                panels.setdefault(n, set()).add(p["title"])
    alerts: dict[str, set[str]] = {}
    # The template's text holds every alert's expression literally; each rule runs to the next "- alert:".
    for block in re.split(r"\n\s*- alert: ", ALERT_RULES.read_text())[1:]:
        alert = block.split()[0]
        expr = block.split("annotations:")[0]
        for n in herald_names(expr, known):
            alerts.setdefault(n, set()).add(alert)
    return panels, alerts


def test_every_panel_and_alert_reading_a_metric_is_named_where_the_metric_is_documented():
    doc = documented_metrics()
    panels, alerts = readers(set(doc))
    unknown = sorted((set(panels) | set(alerts)) - set(doc))
    assert not unknown, f"the dashboard or the alerts read metrics docs/metrics.md does not document: {unknown}"
    problems = []
    for name, m in doc.items():
        named_panels = set(re.findall(r'"([^"]+)"', m.used_by))
        named_alerts = set(re.findall(r"`(Herald[A-Za-z]+)`", m.used_by))
        if named_panels != panels.get(name, set()):
            problems.append(f"{name}: 'Used by' names panels {sorted(named_panels)}, "
                            f"the dashboard's panels reading it are {sorted(panels.get(name, set()))}")
        if named_alerts != alerts.get(name, set()):
            problems.append(f"{name}: 'Used by' names alerts {sorted(named_alerts)}, "
                            f"the alerts reading it are {sorted(alerts.get(name, set()))}")
    assert not problems, "docs/metrics.md's 'Used by' lines are out of date:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------
# docs/operations.md: one subsection per alert


def test_every_alert_has_its_subsection_in_operations():
    alerts = set(re.findall(r"^\s*- alert: (\w+)\s*$", ALERT_RULES.read_text(), re.M))
    assert len(alerts) >= 10, alerts
    text = OPERATIONS_MD.read_text()
    alerts_section = text.split("\n## Alerts\n", 1)
    assert len(alerts_section) == 2, "docs/operations.md has no '## Alerts' section"
    documented = set(re.findall(r"^### (\w+)\s*$", alerts_section[1], re.M))
    assert alerts - documented == set(), f"alerts without a subsection in docs/operations.md: {sorted(alerts - documented)}"
    assert documented - alerts == set(), f"subsections for alerts the chart does not have: {sorted(documented - alerts)}"


# ---------------------------------------------------------------------------------------------------------
# Links


def slugs(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a page: lower case, punctuation dropped, spaces to hyphens,
    repeated headings numbered."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else re.match(r"^#{1,6} (.+?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(markdown: str) -> list[str]:
    """Targets of inline links outside fenced code blocks and code spans."""
    out, in_code = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            out += re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line))
    return out


@pytest.mark.parametrize("page", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    source = REPO / page
    broken = []
    for target in links(source.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (source.parent / path).resolve() if path else source
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"broken links in {page}:\n" + "\n".join(broken)
