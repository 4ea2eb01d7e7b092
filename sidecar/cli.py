"""The ``agent-sidecar`` command."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

from .config import Config, ConfigError, load_config


# The embedded OPA engine is Go code in this process. Go reads GOGC once, from the environment
# the process started with, so it has to be set before start-up, not from Python later. At the
# default of 100 the Go collector costs about a third of the CPU of every policy evaluation
# (docs/performance.md); 400 trades a few MB of heap for it. An operator's own GOGC is kept.
GO_GC_PERCENT = "400"

# `run` validates its config in the process the operator started, then execs a fresh interpreter for
# the server and hands it the validated config through this descriptor (a memfd). The server never
# imports pydantic (the config's validation: ~10 MiB resident for the life of the process, issue 17).
VALIDATED_CONFIG_FD = "AGENT_SIDECAR_VALIDATED_CONFIG_FD"
CONFIG_MEMFD_NAME = "agent-sidecar-config"
CONFIG_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL if sys.platform == "linux" else 0
# -P: the server's imports never come from the directory it was started in (a ./sidecar there is not ours).
SERVER_COMMAND = (sys.executable, "-P", "-m", "sidecar")


def _exec_server(argv: list[str], config_path: Path) -> None:
    """Validate the config here and exec the server with it (and with GOGC set unless the operator set it).

    Returns only where no memfd exists (not Linux): the server then validates the config itself.
    A config error ends this process (exit 2, the message on stderr) before anything is started.
    """
    environment = dict(os.environ)
    environment.setdefault("GOGC", GO_GC_PERCENT)
    if not hasattr(os, "memfd_create"):
        if "GOGC" not in os.environ:
            os.execve(sys.executable, [*SERVER_COMMAND, *argv], environment)
        return
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"agent-sidecar: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    # In memory only, close-on-exec until made inheritable below, and sealed once written: another process of
    # the same user can open it through /proc, and what is unpickled must be exactly what was validated.
    fd = os.memfd_create(CONFIG_MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    payload = pickle.dumps(config)
    data = memoryview(payload)
    while data:
        data = data[os.write(fd, data):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, CONFIG_SEALS)
    if os.pread(fd, len(payload) + 1, 0) != payload:  # changed before the seals were on: start nothing
        print("agent-sidecar: the validated config changed while it was handed over", file=sys.stderr)
        sys.exit(2)
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    environment[VALIDATED_CONFIG_FD] = str(fd)
    os.execve(sys.executable, [*SERVER_COMMAND, *argv], environment)


def _handed_config() -> Config | None:
    """The config validated by the process that exec'd this one (see _exec_server), if any."""
    fd = os.environ.pop(VALIDATED_CONFIG_FD, None)
    if fd is None:
        return None
    # Unpickled only from the memfd _exec_server made: a variable set by hand that names any other
    # descriptor (stdin, a file) is refused, never read.
    try:
        descriptor = int(fd)
        named = os.readlink(f"/proc/self/fd/{descriptor}")
    except (ValueError, OSError):
        named = ""
    if not named.startswith(f"/memfd:{CONFIG_MEMFD_NAME} ") or not _sealed(descriptor):
        raise ConfigError(f"{VALIDATED_CONFIG_FD} names no config handed over by agent-sidecar run; unset it")
    with os.fdopen(descriptor, "rb") as handoff:
        config = pickle.loads(handoff.read())
    if not isinstance(config, Config):
        raise ConfigError(f"{VALIDATED_CONFIG_FD}: not a validated config")
    return config


def _sealed(descriptor: int) -> bool:
    try:
        return fcntl.fcntl(descriptor, fcntl.F_GET_SEALS) & CONFIG_SEALS == CONFIG_SEALS
    except OSError:
        return False


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: about 15% less CPU per proxied call than asyncio's own loop
    (docs/performance.md); asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _run(args: argparse.Namespace) -> int:
    from .app import serve

    try:
        config = _handed_config() or load_config(Path(args.config))
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(serve(config))
    except ConfigError as exc:
        print(f"agent-sidecar: config error: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from .app import build_sidecar

    try:
        build_sidecar(load_config(Path(args.config)))
    except ConfigError as exc:
        print(f"agent-sidecar: config error: {exc}", file=sys.stderr)
        return 2
    print("config ok")
    return 0


def _config_schema(args: argparse.Namespace) -> int:
    from .config_schema import json_schema_text

    sys.stdout.write(json_schema_text())
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from .audit import expand, verify_files

    files = expand([Path(p) for p in args.files])
    if not files:
        print("agent-sidecar: no audit files found", file=sys.stderr)
        return 2
    result = verify_files(files, partial=args.partial)
    if result.ok:
        start = f" from seq {result.first_seq}" if result.first_seq else ""
        print(f"ok: {result.events} events verified in {len(files)} file(s){start}; last hash {result.last_hash}")
        return 0
    print(f"BROKEN after {result.events} verified events: {result.problem}")
    return 1


def _audit_files(args: argparse.Namespace) -> list[Path]:
    from .audit import chain_files, expand

    if args.files:
        return expand([Path(p) for p in args.files])
    if args.config:
        return chain_files(load_config(Path(args.config)).audit_path)
    return expand([Path(".state")])


def _audit_show(args: argparse.Namespace) -> int:
    from .audit.show import render, task_timeline

    try:
        files = _audit_files(args)
    except ConfigError as exc:
        print(f"agent-sidecar: config error: {exc}", file=sys.stderr)
        return 2
    if not files:
        print("agent-sidecar: no audit files found (give FILE..., a directory or --config)", file=sys.stderr)
        return 2
    timeline = task_timeline(files, args.task)
    sys.stdout.write(render(timeline, files))
    return 0 if timeline.events else 1


def _policy_test(args: argparse.Namespace) -> int:
    from .policy.loader import PolicyLoadError
    from .policy.testing import format_report, run_tests

    try:
        report = run_tests(Path(args.dir), coverage=not args.no_coverage)
    except PolicyLoadError as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 2
    print(format_report(report, verbose=args.verbose))
    return 0 if report.failed == 0 and report.results else 1


def _policy_eval(args: argparse.Namespace) -> int:
    from .policy.explain import run_eval

    return run_eval(Path(args.input), Path(args.dir), args.path, as_json=args.json)


def _keys_generate(args: argparse.Namespace) -> int:
    from .credentials import generate_key

    key = generate_key(Path(args.dir), args.algorithm)
    print(f"wrote {key.path} (kid {key.kid}, {key.algorithm})")
    return 0


def _ca_generate(args: argparse.Namespace) -> int:
    from .tls_ca import CaError, generate_ca

    try:
        cert, key = generate_ca(Path(args.dir), days=args.days)
    except CaError as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {cert} (give it to the agent to trust) and {key} (the sidecar's only, mode 0600)")
    return 0


def _ca_install(args: argparse.Namespace) -> int:
    from .tls_ca import CaError, install_ca

    try:
        cert, key = install_ca(Path(args.source), Path(args.destination))
    except CaError as exc:
        print(f"agent-sidecar: {exc}", file=sys.stderr)
        return 2
    print(f"installed {cert} and {key} (mode 0600)")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="agent-sidecar", description="Authorization sidecar for AI agents.")
    root.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = root.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the sidecar")
    run.add_argument("--config", required=True, help="YAML config file")
    run.set_defaults(func=_run)

    check = sub.add_parser("check-config", help="validate a config file and everything it points at")
    check.add_argument("--config", required=True)
    check.set_defaults(func=_check_config)

    config = sub.add_parser("config", help="config file tools").add_subparsers(dest="config_command", required=True)
    schema = config.add_parser("schema", help="print the config file's JSON Schema (docs/config.schema.json)")
    schema.set_defaults(func=_config_schema)

    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="verify the hash chain of one or more audit files, in order")
    verify.add_argument("files", nargs="+", help="files oldest first, or a directory holding audit*.jsonl")
    verify.add_argument("--partial", action="store_true",
                        help="accept a chain that starts mid-way (older files archived elsewhere)")
    verify.set_defaults(func=_audit_verify)
    show = audit.add_parser("show", help="print one task's chain as a readable timeline")
    show.add_argument("--task", required=True, help="task id (X-Agent-Task)")
    show.add_argument("--config", help="read the audit path from this config file")
    show.add_argument("files", nargs="*", help="audit files or a directory (default: .state)")
    show.set_defaults(func=_audit_show)

    policy = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command", required=True)
    test = policy.add_parser("test", help="run the Rego unit tests (test_* rules)")
    test.add_argument("dir", nargs="?", default="rego")
    test.add_argument("--no-coverage", action="store_true")
    test.add_argument("--verbose", action="store_true")
    test.set_defaults(func=_policy_test)
    evaluate = policy.add_parser("eval", help="evaluate the decision for an input document")
    evaluate.add_argument("--input", required=True, help="JSON file: the input document (or {\"input\": ...})")
    evaluate.add_argument("--dir", default="rego")
    evaluate.add_argument("--path", default="sidecar/authz/decision")
    evaluate.add_argument("--json", action="store_true", help="the decision and its explanation as JSON")
    evaluate.set_defaults(func=_policy_eval)
    from .policy.commands import add_lifecycle_commands

    add_lifecycle_commands(policy)  # policy build, policy replay (issue 19)

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command", required=True)
    generate = keys.add_parser("generate", help="write a new signing key into DIR")
    generate.add_argument("dir")
    generate.add_argument("--algorithm", choices=("ES256", "EdDSA"), default="ES256")
    generate.set_defaults(func=_keys_generate)
    ca = sub.add_parser("ca", help="the pod-local CA for TLS interception").add_subparsers(dest="ca_command", required=True)
    ca_generate = ca.add_parser("generate", help="write a new CA (ca.pem, ca-key.pem) into DIR")
    ca_generate.add_argument("dir")
    ca_generate.add_argument("--days", type=int, default=365, help="validity of the CA certificate (default 365)")
    ca_generate.set_defaults(func=_ca_generate)
    ca_install = ca.add_parser("install", help="copy ca.pem and ca-key.pem from SOURCE (a Secret volume) to "
                                               "DESTINATION, the key readable by this user only (an init container)")
    ca_install.add_argument("source")
    ca_install.add_argument("destination")
    ca_install.set_defaults(func=_ca_install)
    from .approvals.cli import add_approvals_parser

    add_approvals_parser(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.func is _run and VALIDATED_CONFIG_FD not in os.environ:
        _exec_server(sys.argv[1:] if argv is None else argv, Path(args.config))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
