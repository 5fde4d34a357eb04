"""`ferry agent`: run an agent in the foreground (what the systemd unit starts)."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.commands.common import add_config_argument, add_home_argument, load_agent_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("agent", help="run an agent in the foreground",
                              description="Serve peers on HOST:PORT and the local CLI on a "
                                          "unix socket inside the home directory.")
    add_home_argument(p)
    add_config_argument(p)
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="address for peer agents (default 127.0.0.1:7370, or agent.toml)")
    p.add_argument("--allow-path", action="append", type=Path, default=[], metavar="DIR",
                   help="directory the agent may read or create VM files in (repeatable)")
    p.add_argument("--qemu", metavar="BINARY", help="QEMU binary (default qemu-system-x86_64)")
    p.add_argument("--ram-dir", type=Path, metavar="DIR",
                   help="where incoming VMs' RAM files go (default /dev/shm)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any "
                        "free port; default off, or metrics_listen in agent.toml)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Loaded only to run an agent: every other command stays quick to start.
    from agent.identity import parse_address
    from agent.net.channel import run as run_on_uvloop
    from agent.state.config import parse_metrics_listen
    config = load_agent_config(args)   # flags given beat the file
    config = config.with_overrides(
        listen=parse_address(args.listen) if args.listen else None,
        allow_paths=(config.allow_paths + tuple(p.absolute() for p in args.allow_path)
                     if args.allow_path else None),
        qemu_binary=args.qemu, ram_dir=args.ram_dir,
        metrics_listen=parse_metrics_listen(args.metrics, "--metrics") if args.metrics
        else None)
    config.qemu_path()  # fail now, not at the first migration
    from agent.malloc_tuning import tune_this_process
    tune_this_process()   # per-batch zstd buffers reused, not faulted in afresh
    from agent.service.daemon import run_agent
    run_on_uvloop(run_agent(config))
    return 0
