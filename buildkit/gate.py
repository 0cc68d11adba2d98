"""The release gate between staging and release registries: an image is promotable only with a passing
verdict in the release index.

ECR: the findings of the image's manifest digest are read (enhanced and basic scanning, every page),
after polling its scan status with the state table below (boto3's image_scan_complete waiter never
succeeds on a continuously scanned image, whose status stays ACTIVE). A finding blocks when it is ACTIVE,
at or above the floor (default HIGH) and has a fix (fixAvailable YES or PARTIAL; basic scanning does not
say, so its findings count as fixable: the gate fails closed), unless an allowlist entry covers it.

A plain OCI registry has no scanner: the gate says so and fails unless the caller chooses explicitly
(`--no-scan-gate`), which is recorded in the index as a waiver, never as "no vulnerabilities".
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import yamlio
from .errors import LmiError, UserError, where
from .interface import Registry

SEVERITIES = ("INFORMATIONAL", "LOW", "MEDIUM", "HIGH", "CRITICAL")
FIXABLE = {"YES", "PARTIAL"}
# imageScanStatus.status (every value of ECR's ScanStatus enum, botocore 1.44 service model) -> what the
# poll does. NOT_FOUND stands for ScanNotFoundException (no scan of the digest yet). Anything else fails
# closed, as does a timeout.
STATES = {"COMPLETE": "go", "ACTIVE": "go", "PENDING": "wait", "IN_PROGRESS": "wait", "NOT_FOUND": "wait",
          "FAILED": "fail", "UNSUPPORTED_IMAGE": "fail", "FINDINGS_UNAVAILABLE": "fail",
          "SCAN_ELIGIBILITY_EXPIRED": "fail", "LIMIT_EXCEEDED": "fail", "IMAGE_ARCHIVED": "fail",
          "IMAGE_SIZE_EXCEEDED": "fail"}
SCOPES = ("global", "line", "image")
ENTRY_KEYS = {"id", "package", "scope", "line", "image", "reason", "expires", "owner"}
DEFAULT_ALLOWLIST = Path("scan-allowlist.yaml")


class GateFailed(LmiError):
    """The gate refused an image, or could not decide (exit 1). Nothing was promoted."""


@dataclass(frozen=True)
class Allow:
    id: str
    scope: str
    reason: str
    expires: dt.date
    owner: str
    where: str
    package: str | None = None
    target: str | None = None  # the line (scope line) or image id (scope image)

    def covers(self, finding: Finding, spec) -> bool:
        if finding.id != self.id or (self.package and self.package != finding.package):
            return False
        return (self.scope == "global" or (self.scope == "line" and self.target == spec.line)
                or (self.scope == "image" and self.target == spec.id))


@dataclass(frozen=True)
class Finding:
    id: str
    package: str | None
    severity: str
    status: str  # ACTIVE, SUPPRESSED, CLOSED
    fix: str  # YES, NO, PARTIAL; UNKNOWN for basic scanning
    source: str  # "enhanced" or "basic"

    def blocks(self, floor: str) -> bool:
        """ACTIVE, at or above the floor (an unknown severity such as UNTRIAGED counts: fail closed), fixable
        (an unknown fix counts too)."""
        rank = SEVERITIES.index(self.severity) if self.severity in SEVERITIES else len(SEVERITIES)
        return self.status == "ACTIVE" and rank >= SEVERITIES.index(floor) and self.fix in FIXABLE | {"UNKNOWN"}


def load_allowlist(path: Path, today: dt.date | None = None) -> tuple[list[Allow], list[str]]:
    """(entries, expired): a malformed entry (unknown scope or key, empty reason or owner, bad date) is bad
    input (UserError, file:line); an expired one is returned in `expired` (it fails the gate)."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    if not Path(path).exists():
        return [], []
    doc = yamlio.load_file(Path(path)) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("allow", []), list) or set(doc) - {"allow"}:
        raise UserError(f"{path}: expected a mapping with one key, `allow:` (a list of entries); see "
                        "docs/supply-chain.md")
    items = doc.get("allow") or []
    entries, expired, problems = [], [], []
    for i, raw in enumerate(items):
        loc = where(str(path), items.line_of(i) if hasattr(items, "line_of") else None)
        if not isinstance(raw, dict):
            problems.append(f"{loc}: an entry is a mapping {{id, package?, scope, reason, expires, owner}}")
            continue
        unknown, wrong = sorted(set(raw) - ENTRY_KEYS), []
        scope = raw.get("scope")
        expires = _date(raw.get("expires"))
        target = raw.get(scope) if scope in ("line", "image") else None
        keys = ", ".join(sorted(ENTRY_KEYS))
        for bad, text in ((unknown, f"unknown key(s) {', '.join(unknown)}; the keys are {keys}"),
                          (not str(raw.get("id") or "").strip(), "no id (e.g. CVE-2024-3094)"),
                          (scope not in SCOPES, f"scope {scope!r} is unknown; use one of {', '.join(SCOPES)}"),
                          (scope in ("line", "image") and not target, f"scope {scope} needs `{scope}:` (which one)"),
                          (not str(raw.get("reason") or "").strip(), "an empty reason; say why this is acceptable"),
                          (not str(raw.get("owner") or "").strip(), "no owner; name who reviews it"),
                          (expires is None, "expires must be a date (YYYY-MM-DD)")):
            if bad:
                wrong.append(f"{loc}: allowlist entry {raw.get('id') or i + 1}: {text}")
        if wrong:
            problems += wrong
            continue
        entry = Allow(str(raw["id"]).strip(), scope, str(raw["reason"]).strip(), expires, str(raw["owner"]).strip(),
                      loc, str(raw["package"]) if raw.get("package") else None, str(target) if target else None)
        (expired if expires < today else entries).append(entry)
    if problems:
        raise UserError(*problems)
    return entries, expired


def _date(value) -> dt.date | None:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        return None


# --- reading ECR --------------------------------------------------------------------------------------


@dataclass
class Scan:
    status: str
    description: str = ""
    findings: list[Finding] = field(default_factory=list)
    pages: int = 0


def poll(client, registry_id: str, repository: str, digest: str, timeout_s: float = 1800, interval_s: float = 15,
         clock=time.monotonic, sleep=time.sleep) -> Scan:
    """Wait for a usable scan of repository@digest, then read every page of its findings. Fails closed
    (GateFailed) on a failure status, an unknown one, or the timeout."""
    from botocore.exceptions import ClientError

    deadline = clock() + timeout_s
    kwargs = {"registryId": registry_id, "repositoryName": repository, "imageId": {"imageDigest": digest}}
    while True:
        try:
            page = client.describe_image_scan_findings(**kwargs)
            status = (page.get("imageScanStatus") or {}).get("status") or "UNKNOWN"
            description = (page.get("imageScanStatus") or {}).get("description") or ""
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code != "ScanNotFoundException":
                raise GateFailed(f"{repository}@{digest}: ECR refused to describe the scan ({code}: "
                                 f"{exc.response['Error'].get('Message', '')[:200]}); the gate fails closed") from None
            page, status, description = None, "NOT_FOUND", "no scan of this digest yet"
        state = STATES.get(status, "fail")
        if state == "go":
            break
        if state == "fail":
            raise GateFailed(f"{repository}@{digest}: scan status {status} ({description or 'no description'}); "
                             "nothing was checked, so the gate fails closed")
        if clock() >= deadline:
            raise GateFailed(f"{repository}@{digest}: the scan is still {status} after {timeout_s:.0f}s; the gate "
                             "fails closed (raise --scan-timeout, or check the registry's scanning configuration)")
        sleep(interval_s)
    scan = Scan(status, description)
    while True:
        scan.pages += 1
        scan.findings += _findings(page.get("imageScanFindings") or {})
        token = page.get("nextToken")
        if not token:
            return scan
        page = client.describe_image_scan_findings(**kwargs, nextToken=token)


def _findings(block: dict) -> list[Finding]:
    out = []
    for f in block.get("enhancedFindings") or []:
        details = f.get("packageVulnerabilityDetails") or {}
        packages = [p.get("name") for p in details.get("vulnerablePackages") or []] or [None]
        for package in packages:
            out.append(Finding(details.get("vulnerabilityId") or f.get("title") or f.get("findingArn", "?"), package,
                               str(f.get("severity", "UNDEFINED")).upper(), str(f.get("status", "ACTIVE")).upper(),
                               str(f.get("fixAvailable", "UNKNOWN")).upper(), "enhanced"))
    for f in block.get("findings") or []:
        attrs = {a.get("key"): a.get("value") for a in f.get("attributes") or []}
        out.append(Finding(f.get("name", "?"), attrs.get("package_name"), str(f.get("severity", "UNDEFINED")).upper(),
                           "ACTIVE", "UNKNOWN", "basic"))
    return out


# --- deciding -------------------------------------------------------------------------------------------


def decide(scan: Scan, spec, allow: list[Allow], expired: list[Allow], floor: str, scanner: str) -> dict:
    """The verdict for one image: what the index records and promotion reads."""
    blocking, allowlisted = [], []
    for f in scan.findings:
        if not f.blocks(floor):
            continue
        if any(a.covers(f, spec) for a in allow):
            allowlisted.append(f)
        else:
            blocking.append(f)
    counts: dict[str, int] = {}
    for f in scan.findings:
        if f.status == "ACTIVE":
            counts[f.severity] = counts.get(f.severity, 0) + 1
    expired_ids = sorted({a.id for a in expired})
    return {
        "passed": not blocking and not expired_ids, "scanner": scanner, "scan_status": scan.status,
        "floor": floor, "counts": dict(sorted(counts.items())), "findings": len(scan.findings),
        "blocking": sorted({_label(f) for f in blocking}), "allowlisted": sorted({_label(f) for f in allowlisted}),
        "expired_allowlist": expired_ids, "checked": _now(),
    }


def waived(registry_url: str, reason: str) -> dict:
    """The verdict of an explicit --no-scan-gate: promotable, and plainly not a scan."""
    return {"passed": True, "scanner": "none", "waived": reason, "registry": registry_url, "checked": _now(),
            "note": "no vulnerability database was consulted; nothing is claimed about vulnerabilities"}


def used(allow: list[Allow], scans: list[tuple[object, Scan]], floor: str) -> set[Allow]:
    return {a for spec, scan in scans for f in scan.findings if f.blocks(floor) for a in allow if a.covers(f, spec)}


def refusal(entry: dict | None, spec_id: str) -> str | None:
    """Why an index entry may not be promoted (None: it may)."""
    if entry is None:
        return f"{spec_id}: not in the release index; `lmi push` it, then `lmi gate` it"
    verdict = entry.get("gate")
    if not verdict:
        return (f"{spec_id}: {entry['digest'][:19]}… has no gate verdict; run `lmi gate` on the registry it was "
                "pushed to (a plain OCI registry has no scanner: `lmi gate --no-scan-gate` records that choice)")
    if not verdict.get("passed"):
        why = "; ".join(filter(None, [
            verdict.get("error"),
            verdict.get("blocking") and f"blocking findings {', '.join(verdict['blocking'][:10])}",
            verdict.get("expired_allowlist")
            and f"expired allowlist entries {', '.join(verdict['expired_allowlist'])}"]))
        return (f"{spec_id}: {entry['digest'][:19]}… failed the gate at {verdict.get('checked')} "
                f"({why or 'see lmi gate'})")
    return None


def _label(f: Finding) -> str:
    return f"{f.id} ({f.package}, {f.severity})" if f.package else f"{f.id} ({f.severity})"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- running it -----------------------------------------------------------------------------------------


def run(specs: list, address, index_path: Path, allowlist: Path = DEFAULT_ALLOWLIST, floor: str = "HIGH",
        no_scan_gate: bool = False, timeout_s: float = 1800, interval_s: float = 15,
        say=print, *, profiles: Registry) -> list[tuple[object, dict]]:
    """Gate each image as published in `address` (by the digest its index entry records); write each
    verdict into its index entry. Returns (spec, verdict) pairs; the caller fails when one did not pass."""
    from . import index

    floor = floor.upper()
    if floor not in SEVERITIES:
        raise UserError(f"--floor {floor}: use one of {', '.join(SEVERITIES)}")
    allow, expired = load_allowlist(allowlist)
    known = index.load(index_path, profiles)
    chosen = []
    for spec in specs:
        listed = [e for e in known["images"] if e["id"] == spec.id
                  and any(r["url"] == address.url for r in e.get("registries", []))]
        if not listed:
            raise UserError(f"{spec.id}: the index {index_path} lists no image of it in {address.url}; "
                            f"`lmi push --registry {address.url}` it first (or pass the --index push wrote)")
        chosen.append((spec, max(listed, key=lambda e: e.get("built") or "")))
    if address.kind != "ecr" and not no_scan_gate:
        raise GateFailed(f"{address.url} is a plain OCI registry: it has no vulnerability scanner, so nothing can "
                         "be checked there and nothing is claimed. Choose explicitly: scan the SBOM (`lmi sbom`) with "
                         "a scanner that has a database, or pass --no-scan-gate to record a waiver in the index")
    results, scans = [], []
    client = None
    for spec, entry in chosen:
        if no_scan_gate:
            verdict = waived(address.url, "--no-scan-gate")
            say(f"{spec.id}: NOT SCANNED (--no-scan-gate; recorded in the index as a waiver)")
        else:
            if client is None:
                from .registry import Ecr

                client = Ecr(address).client
            repo = address.path(spec.repository)
            try:
                scan = poll(client, address.account, repo, entry["digest"], timeout_s, interval_s)
                verdict = decide(scan, spec, allow, expired, floor, "ecr")
                scans.append((spec, scan))
            except GateFailed as exc:
                verdict = {"passed": False, "scanner": "ecr", "error": str(exc), "floor": floor, "checked": _now()}
            verdict.update(registry=address.url, allowlist=str(allowlist))
            say(describe(spec.id, verdict))
        results.append((spec, verdict))
        entry = {**entry, "gate": verdict}
        index.update(index_path, [entry], profiles, source=f"the gate of {spec.id}")
    for a in expired:
        say(f"{a.where}: allowlist entry {a.id} expired on {a.expires} (owner {a.owner}): the gate fails until it "
            "is reviewed (renew `expires` with a reason) or removed")
    if not no_scan_gate:
        for a in sorted(set(allow) - used(allow, scans, floor), key=lambda a: a.where):
            say(f"{a.where}: allowlist entry {a.id} matched no blocking finding of this run (unused)")
    return results


def describe(spec_id: str, verdict: dict) -> str:
    if verdict.get("error"):
        return f"{spec_id}: FAILED CLOSED: {verdict['error']}"
    counts = ", ".join(f"{k} {v}" for k, v in verdict["counts"].items()) or "none"
    head = "passed" if verdict["passed"] else "FAILED"
    lines = [f"{spec_id}: {head} (scan {verdict['scan_status']}, floor {verdict['floor']}, active findings: {counts})"]
    lines += [f"  blocking: {b}" for b in verdict["blocking"]]
    lines += [f"  allowlisted: {a}" for a in verdict["allowlisted"]]
    lines += [f"  expired allowlist entry: {e}" for e in verdict["expired_allowlist"]]
    return "\n".join(lines)
