"""Secrets and personal data out of text, before anything is written, logged or sent anywhere.

`scrub(text) -> (text, counts)`: every match is replaced by a typed placeholder such as
`<SECRET:aws_access_key>`; counts are per kind, and the secret itself is never returned, logged or
printed.

Where the rules come from:
- detect-secrets (Yelp, maintained): the patterns of every regex plugin it ships (AWS, GitHub, GitLab,
  Slack, Stripe, JWT, private-key headers, URL credentials, npm, PyPI, OpenAI, SendGrid, Twilio, Azure,
  IBM, ...), read from the installed plugins, so a newer detect-secrets brings its new rules; and its
  keyword rules for values assigned to names like password / secret / api_key / private_key in YAML,
  INI, .env, JSON and code (applied line by line, as detect-secrets does). Its high-entropy plugins
  are not used: in documentation they flag checksums, hashes and example IDs by the hundred.
- Added here (what detect-secrets lacks; names after gitleaks' rule ids): whole private-key blocks
  (BEGIN .. END, not only the header line), Authorization/Bearer tokens, GitHub fine-grained tokens,
  Google API keys, Hugging Face, Docker Hub, HashiCorp Vault and npm tokens, e-mail addresses, and
  with `ips=True` IPv4 addresses (public ones by detect-secrets' rule, and the private ranges).
- A user's rules file (YAML): `allow:` regexes (a match whose text matches one is kept) and `rules:`
  (kind: regex; group 1, when the regex has one, is the secret).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from devops_cli.errors import DevopsError

# rules added to detect-secrets' (kind, regex, anchors); group 1, when present and ending the match, is the secret
EXTRA = [
    ("private_key", r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\n[ \t]*\n|\Z)", None),
    ("private_key", r"PuTTY-User-Key-File-\d+:[\s\S]*?(?:Private-MAC: *\S+|\n[ \t]*\n|\Z)", None),
    ("bearer_token", r"(?i)\bbearer[ \t]+([A-Za-z0-9\-._~+/]{12,}=*)", ("bearer",)),
    ("authorization", r"(?i)\bauthorization[\"']?[ \t]*[:=][ \t]*[\"']?(?:basic|token|digest)[ \t]+([A-Za-z0-9\-._~+/]{8,}=*)",
     ("authorization",)),
    ("github_token", r"\bgithub_pat_[A-Za-z0-9_]{60,}", ("github_pat_",)),  # gitleaks github-fine-grained-pat
    ("google_api_key", r"\bAIza[0-9A-Za-z\-_]{35}", ("aiza",)),  # gitleaks gcp-api-key
    ("huggingface_token", r"\bhf_[A-Za-z]{34}\b", ("hf_",)),  # gitleaks huggingface-access-token
    ("docker_token", r"\bdckr_pat_[A-Za-z0-9_-]{27}\b", ("dckr_pat_",)),  # dockerhub personal access token
    ("vault_token", r"\bhv[sb]\.[A-Za-z0-9_-]{24,}", ("hvs.", "hvb.")),  # gitleaks vault-service-token
    ("npm_token", r"\bnpm_[A-Za-z0-9]{36}\b", ("npm_",)),  # gitleaks npm-access-token
    ("slack_token", r"\bxapp-\d-[A-Z0-9]+-\d+-[a-z0-9]+", ("xapp-",)),  # gitleaks slack-app-token
    ("openai_token", r"\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}", ("sk-",)),
    ("email", r"(?<![\w.%+:/-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", ("@",)),
]  # fmt: skip
# where each detect-secrets rule can match, by kind: literals found on the line (ASCII case ignored, unless the
# literal has capitals), or a regex over the lower-cased text; a kind missing here (a newer detect-secrets) runs
# over the whole text
ANCHORS = {
    "artifactory_credentials": ("AKC", "AP"), "aws_access_key": ("A3T", "ABIA", "ACCA", "AKIA", "ASIA", "aws"),
    "azure_storage_key": ("accountkey=",), "url_credentials": ("://",),
    "cloudant_credentials": r"cl(?:ou(?:dant)?)?[_-]?(?:api)?(?:key|pw|pass|token)|cloudant",
    "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    "gitlab_token": ("gl", "GR1348941"),
    "ibm_cloud_iam_key": ("ibm", "iam"), "ibm_cos_hmac_credentials": ("secret",), "json_web_token": ("eyj",),
    "mailchimp_access_key": ("-us",), "npm_token": ("_authtoken",), "openai_token": ("t3blbkfj",),
    "private_key": ("begin", "putty"), "pypi_token": ("pypi-",), "sendgrid_api_key": ("sg.",),
    "slack_token": ("xox", "hooks.slack.com"), "square_oauth_secret": ("sq0csp-",), "stripe_access_key": ("k_live_",),
    "softlayer_credentials": r"softlayer|sl[_-]?(?:api)?[_-]?(?:key|pw|pass|token)",
    "telegram_bot_token": ("bot", "telegram", "token"), "twilio_api_key": ("AC", "SK"), "discord_bot_token": None,
    "public_ip_ipv4": None,
    "password": ("password", "passwd", "pwd", "secret", "contrase", "_pass", "keypass", "dbpass", "apikey", "api_key",
                 "authkey", "auth_key", "servicekey", "service_key", "accountkey", "account_key", "dbkey", "db_key",
                 "databasekey", "database_key", "privkey", "priv_key", "privatekey", "private_key", "clientkey",
                 "client_key"),  # the words of detect-secrets' keyword DENYLIST
}  # fmt: skip
IP_PRIVATE = r"(?<![\w.])(?:10(?:\.\d{1,3}){3}|172\.(?:1[6-9]|2\d|3[01])(?:\.\d{1,3}){2}|192\.168(?:\.\d{1,3}){2})(?![\w.])"
# kept by default: documentation examples (RFC 2606 domains) and git's ssh user
ALLOW = [r"@(?:[\w-]+\.)*example\.(?:com|org|net)$", r"^git@", r"^<SECRET:"]
DETECT_SECRETS_SKIP = {"Public IP (ipv4)"}  # opt-in (ips=True)
_NAMES = {"Secret Keyword": "password", "Basic Auth Credentials": "url_credentials", "AWS Access Key": "aws_access_key",
          "Azure Storage Account access key": "azure_storage_key", "NPM tokens": "npm_token"}  # fmt: skip
ASSIGNS = re.compile(r"[:=(;]")
ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def kind_of(secret_type: str) -> str:
    """detect-secrets' secret_type -> the placeholder's kind ('GitHub Token' -> github_token)."""
    return _NAMES.get(secret_type) or re.sub(r"[^a-z0-9]+", "_", secret_type.lower()).strip("_")


@dataclass
class Rule:
    kind: str
    pattern: re.Pattern
    group: int | None = None  # the secret's group (keyword rules); None: _span decides
    anchors: tuple[str, ...] | re.Pattern | None = None  # None: run over the whole text


@dataclass
class Rules:
    rules: list[Rule] = field(default_factory=list)
    allow: list[re.Pattern] = field(default_factory=list)
    # every anchor literal in one Aho-Corasick automaton (pyahocorasick): one pass over the text finds
    # them all (60 str.find passes ran at 2.5 MB/s; the automaton at 8); capitals: matched as written
    lower_index: object = None
    case_index: object = None

    def __post_init__(self):
        import ahocorasick

        self.lower_index, self.case_index = ahocorasick.Automaton(), ahocorasick.Automaton()
        for rule in self.rules:
            for literal in rule.anchors if isinstance(rule.anchors, tuple) else ():
                index = self.lower_index if literal == literal.lower() else self.case_index
                index.add_word(literal, literal)
        for index in (self.lower_index, self.case_index):
            if len(index):
                index.make_automaton()

    @property
    def kinds(self) -> list[str]:
        return sorted({r.kind for r in self.rules})

    def anchor_hits(self, text: str, low: str) -> dict[str, list[int]]:
        """{literal: [start, ...]} of every anchor literal in the text."""
        hits: dict[str, list[int]] = {}
        for index, haystack in ((self.lower_index, low), (self.case_index, text)):
            if len(index):
                for end, literal in index.iter(haystack):
                    hits.setdefault(literal, []).append(end - len(literal) + 1)
        return hits


def _anchors(kind: str, spec=...):
    spec = ANCHORS.get(kind) if spec is ... else spec
    return re.compile(spec) if isinstance(spec, str) else spec


def _detect_secrets_rules(ips: bool) -> list[Rule]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins import keyword
    from detect_secrets.plugins.base import RegexBasedDetector

    out = []
    for secret_type, cls in sorted(get_mapping_from_secret_type_to_class().items()):
        if issubclass(cls, RegexBasedDetector) and (ips or secret_type not in DETECT_SECRETS_SKIP):
            kind = kind_of(secret_type)
            out += [Rule(kind, p, None, _anchors(kind)) for p in cls.denylist]
    groups = {**keyword.QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, **keyword.CONFIG_DENYLIST_REGEX_TO_GROUP}
    return out + [Rule("password", p, g, _anchors("password")) for p, g in groups.items()]


@lru_cache(maxsize=8)
def load_rules(path: str | None = None, ips: bool = False) -> Rules:
    """The rules (ours + detect-secrets' + the user's file at `path`), compiled once per process."""
    rules = [Rule(k, re.compile(p), None, a) for k, p, a in EXTRA] + _detect_secrets_rules(ips)
    if ips:
        rules.append(Rule("ip_private", re.compile(IP_PRIVATE)))
    allow = [re.compile(p) for p in ALLOW]
    if path:
        user = _read_user_rules(Path(path))
        allow += user["allow"]
        rules = [Rule(k, p) for k, p in user["rules"]] + rules
    return Rules(rules, allow)


def _read_user_rules(path: Path) -> dict:
    import yaml

    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DevopsError(f"cannot read the secrets rules file: {type(e).__name__}", where,
                          "a YAML file with 'allow:' (list of regexes) and 'rules:' (kind: regex)") from None
    if not isinstance(data, dict) or set(data) - {"allow", "rules"}:
        raise DevopsError("the secrets rules file takes the keys 'allow' and 'rules'", where,
                          "allow: [regex, ...]; rules: {kind: regex, ...}")
    out = {"allow": [], "rules": []}
    for i, pattern in enumerate(data.get("allow") or []):
        out["allow"].append(_compile(pattern, f"{where} (allow[{i}])"))
    rules = data.get("rules") or {}
    if not isinstance(rules, dict):
        raise DevopsError("'rules' must map a kind to a regex", where, "rules: {internal_host: '\\\\bdb\\\\d+\\\\.corp\\\\b'}")
    for kind, pattern in rules.items():
        if not re.fullmatch(r"[a-z0-9_]+", str(kind)):
            raise DevopsError(f"kind '{kind}' must be lower-case letters, digits and _", f"{where} (rules)")
        out["rules"].append((str(kind), _compile(pattern, f"{where} (rules.{kind})")))
    return out


def _compile(pattern, where: str) -> re.Pattern:
    try:
        return re.compile(str(pattern))
    except re.error as e:
        raise DevopsError(f"invalid regex: {e}", where, "fix the pattern (Python re syntax)") from None


def _span(m: re.Match) -> tuple[int, int]:
    """The secret's part of a match: its last non-empty group when that group ends the match (give or
    take a closing quote or '@'), else the whole match with delimiters trimmed."""
    for g in range(m.re.groups, 0, -1):
        if m.group(g) and m.end() - m.end(g) <= 2 and m.start(g) > m.start():
            return m.start(g), m.end(g)
    start, end, s = m.start(), m.end(), m.string
    while start < end and s[start] in " \t\n=:\"'":
        start += 1
    while end > start and s[end - 1] in " \t\n\"'":
        end -= 1
    return start, end


def _lines(text: str, starts) -> list[tuple[int, int]]:
    """(start, end) of the lines of `text` that hold the positions `starts`."""
    lines = set()
    for i in starts:
        lines.add((text.rfind("\n", 0, i) + 1, len(text) if (j := text.find("\n", i)) < 0 else j))
    return sorted(lines)


def find(text: str, rules: Rules) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every secret in `text`, overlapping finds merged (the first one's kind).

    A rule with anchors runs only on the lines that hold one (finding literals is ~100x faster than
    most of these regexes); one without runs over the whole text."""
    low = text.lower()
    if len(low) != len(text):  # a few characters lower to two ('İ'): offsets must carry over
        low = text.translate(ASCII_LOWER)
    spans = []
    lines_of: dict = {}
    hits = rules.anchor_hits(text, low)
    for rule in rules.rules:
        if rule.anchors is None:
            windows = [(0, len(text))]
        else:
            key = rule.anchors if isinstance(rule.anchors, tuple) else rule.anchors.pattern
            if key not in lines_of:
                starts = [m.start() for m in rule.anchors.finditer(low)] if isinstance(rule.anchors, re.Pattern) \
                    else [i for literal in rule.anchors for i in hits.get(literal, ())]
                lines_of[key] = _lines(text, starts)
            windows = lines_of[key]
        for start, end in windows:  # a line on its own, as detect-secrets scans ('^' is its start)
            segment = text if end - start == len(text) else text[start:end]
            if rule.group is not None and not ASSIGNS.search(segment):
                continue  # every keyword rule needs one of : = ( ; after the name
            for m in rule.pattern.finditer(segment):
                if rule.group is None:
                    a, b = _span(m)
                elif m.group(rule.group).split():
                    # keyword rules: the value up to the first blank (a password has none; prose after it is not it)
                    a = m.start(rule.group)
                    b = a + len(m.group(rule.group).split()[0])
                else:
                    continue
                spans.append((start + a, start + b, rule.kind))
    spans = [s for s in spans if s[1] > s[0] and not any(a.search(text[s[0]:s[1]]) for a in rules.allow)]
    spans.sort(key=lambda s: (s[0], -s[1]))
    merged: list[tuple[int, int, str]] = []
    for start, end, kind in spans:
        if merged and start < merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end, merged[-1][2])
            continue
        merged.append((start, end, kind))
    return merged


def scrub(text: str, rules: Rules | None = None) -> tuple[str, Counter]:
    """-> (text with each secret replaced by <SECRET:kind>, Counter of kinds)."""
    rules = rules or load_rules()
    spans = find(text, rules)
    if not spans:
        return text, Counter()
    out, last = [], 0
    for start, end, kind in spans:
        out += [text[last:start], f"<SECRET:{kind}>"]
        last = end
    out.append(text[last:])
    return "".join(out), Counter(kind for _, _, kind in spans)
