"""``agent-sidecar policy build`` and ``policy replay`` (issue 19; docs/policy.md, "The policy's life")."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_lifecycle_commands(policy: Any) -> None:
    """Add the subcommands to ``agent-sidecar policy`` (an argparse subparsers object)."""
    build = policy.add_parser("build", help="write an OPA bundle (.tar.gz) of a policy directory, optionally signed")
    build.add_argument("dir", nargs="?", default="rego")
    build.add_argument("-o", "--output", required=True, help="the bundle file to write, e.g. bundle.tar.gz")
    build.add_argument("--revision", required=True, help="the bundle's revision, e.g. the git commit")
    build.add_argument("--signing-key", help="PEM private key (RSA, EC or Ed25519): writes .signatures.json")
    build.add_argument("--key-id", default="default", help="the key id in the signature (default: default)")
    build.add_argument("--algorithm", help="signing algorithm (default: RS256 for RSA keys, ES256 for P-256 keys, ...)")
    build.add_argument("--root", action="append", dest="roots",
                       help="a manifest root (repeatable; default: the first segment of every package and data key)")
    build.add_argument("--no-check", action="store_true", help="do not compile the policy before writing the bundle")
    build.set_defaults(func=_build)

    replay = policy.add_parser("replay", help="re-decide recorded calls with a candidate policy; exit 1 when any would change")
    replay.add_argument("--audit", required=True, nargs="+", help="audit files (JSONL) or directories holding them")
    replay.add_argument("--policy", required=True, help="the candidate: a policy directory or a bundle file")
    replay.add_argument("--public-key", help="PEM public key to verify a signed candidate bundle")
    replay.add_argument("--path", default="sidecar/authz/decision", help="the decision path")
    replay.add_argument("--examples", type=int, default=3, help="example decision ids per group (default 3)")
    replay.add_argument("--json", action="store_true", help="the report as JSON")
    replay.set_defaults(func=_replay)


def _build(args: argparse.Namespace) -> int:
    from .bundle import build_bundle
    from .loader import PolicyLoadError

    try:
        key = Path(args.signing_key).read_bytes() if args.signing_key else None
    except OSError as exc:
        print(f"agent-sidecar: {args.signing_key}: cannot read: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        content = build_bundle(Path(args.dir), revision=args.revision, roots=args.roots, signing_key=key,
                               key_id=args.key_id, algorithm=args.algorithm)
        if not args.no_check:
            _compile(content, args.output)
    except PolicyLoadError as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 1
    Path(args.output).write_bytes(content)
    print(f"wrote {args.output}: revision {args.revision}" + (f", signed (key id {args.key_id})" if key else ", unsigned"))
    return 0


def _compile(content: bytes, origin: str) -> None:
    """The bundle as the sidecar reads it, compiled and data-checked in an embedded engine (when installed)."""
    from .bundle import read_bundle
    from .embedded import EmbeddedEngine, opa_available

    if not opa_available():
        return
    read = read_bundle(content, origin=origin, verify=False)
    EmbeddedEngine(read.policy).close_now()


def _replay(args: argparse.Namespace) -> int:
    from .replay import run_replay

    code: int = run_replay(args)
    return code
