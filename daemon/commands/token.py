"""`anvil-compute token issue`: mint a narrower token from the fabric's shared secret.

Run where the secret is (a peer's host, as its user): it reads `auth_secret_file`
(default DATA_DIR/auth.secret) from the same settings as `serve`, and never
creates one. The token goes to stdout; give it to a tenant as its bearer token.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from daemon import auth, config
from daemon.exceptions import ConfigError, InvalidArgument

MAX_TTL_S = 366 * 24 * 3600
OBJECT_ACTIONS = (auth.SCOPE_OBJECT_READ, auth.SCOPE_OBJECT_WRITE)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    token = subparsers.add_parser("token", help="mint bearer tokens")
    verbs = token.add_subparsers(dest="verb", required=True, metavar="VERB")
    issue = verbs.add_parser(
        "issue",
        help="mint a token from the shared secret",
        description="Mint a token signed with the fabric's shared secret. Without --scope: "
        "a tenant's scopes (submit, read, cancel its own jobs; read and write objects).",
    )
    issue.add_argument("--sub", required=True, help="the subject: who the token is for")
    issue.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="SCOPE",
        help="ACTION or ACTION|RESOURCE, e.g. compute:submit, object:read|photos/* "
        "(repeatable; default: the client scopes)",
    )
    issue.add_argument(
        "--bucket",
        action="append",
        default=[],
        metavar="BUCKET[/PREFIX]",
        help="limit the object scopes to these buckets (or key prefixes) (repeatable)",
    )
    issue.add_argument("--tenant", default="", help="whose jobs these are (default: the subject)")
    issue.add_argument("--ttl", default="30d", help="lifetime: 3600, 90s, 15m, 12h, 30d")
    issue.add_argument("--config", type=Path, help="TOML file (default /etc/anvil-compute/...)")
    issue.add_argument("--data-dir", type=Path, help="where auth.secret is")
    issue.set_defaults(handler=run_issue)


def scopes_for(scopes: list[str], buckets: list[str]) -> list[str]:
    """The scopes asked for (default: the client scopes), object scopes limited to
    `buckets` when any are given. Raises InvalidArgument."""
    chosen = scopes or list(auth.CLIENT_SCOPES)
    for text in chosen:
        if auth.Scope.parse(text).action not in auth.KNOWN_ACTIONS:
            raise InvalidArgument(f"unknown action in scope {text!r}")
    if not buckets:
        return chosen
    patterns = []
    for bucket in buckets:
        name, _, prefix = bucket.partition("/")
        if not name or "*" in bucket or "|" in bucket:
            raise InvalidArgument(f"--bucket {bucket!r}: expected BUCKET or BUCKET/PREFIX")
        patterns.append(f"{name}/{prefix}*")
    limited: list[str] = []
    for text in chosen:
        scope = auth.Scope.parse(text)
        if scope.action in OBJECT_ACTIONS and scope.resource == "*":
            limited.extend(f"{scope.action}|{pattern}" for pattern in patterns)
        elif scope.action in ("object:*", "*"):
            raise InvalidArgument(f"--bucket cannot narrow {text!r}: name object:read/write")
        else:
            limited.append(text)
    return limited


def run_issue(args: argparse.Namespace) -> int:
    overrides = {"data_dir": args.data_dir}
    settings = config.load(config_file=args.config, overrides=overrides)
    ttl = auth.parse_ttl(args.ttl)
    if ttl > MAX_TTL_S:
        raise InvalidArgument(f"--ttl {args.ttl}: at most {MAX_TTL_S // 86400} days")
    path = settings.secret_path
    if not path.exists():
        raise ConfigError(f"no auth secret at {path}: run `anvil-compute serve` there first")
    secret = auth.load_or_create_secret(path)
    token = auth.issue_token(
        secret,
        sub=args.sub,
        scopes=scopes_for(args.scope, args.bucket),
        ttl_s=ttl,
        tenant=args.tenant,
    )
    sys.stdout.write(token + "\n")
    return 0
