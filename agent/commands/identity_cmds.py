"""`ferry id`, `ferry trust`, `ferry untrust` and `ferry peers`: this host's key and whom it
trusts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.commands.common import add_home_argument, resolve_home
from agent.errors import UserError

# agent.identity (X25519 keys, the cryptography package) loads in the commands that use it:
# every `ferry` command builds this parser.


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "id", help="print this host's public key (creating the identity on first use)",
        description="Print this host's public key, one line of base64. Give it to the other "
                    "host's `ferry trust`. The identity is created on first use.")
    add_home_argument(p)
    p.add_argument("--fingerprint", action="store_true",
                   help="print the key's SHA256 fingerprint instead")
    p.set_defaults(func=cmd_id)

    p = subparsers.add_parser(
        "trust", help="trust another host's agent (add or update a peer)",
        description="Add peer NAME with public key PUBKEY (the output of `ferry id` on that "
                    "host) to the trusted peers, or update it. Both hosts must trust each "
                    "other before their agents will talk.")
    add_home_argument(p)
    p.add_argument("name", metavar="NAME", help="a name for the peer, e.g. its host name")
    p.add_argument("public_key", metavar="PUBKEY", help="the peer's public key (base64)")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="where the peer's agent listens (kept from before if not given)")
    p.set_defaults(func=cmd_trust)

    p = subparsers.add_parser("untrust", help="remove a trusted peer",
                              description="Remove peer NAME from the trusted peers.")
    add_home_argument(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_untrust)

    p = subparsers.add_parser("peers", help="list the trusted peers",
                              description="List the trusted peers: name, address, key.")
    add_home_argument(p)
    p.add_argument("--json", action="store_true", help="one JSON array on stdout")
    p.set_defaults(func=cmd_peers)


def cmd_id(args: argparse.Namespace) -> int:
    from agent import identity
    home = resolve_home(args)
    me, created = identity.load_identity(home)
    if created:
        print(f"ferry: created a new identity in {home} ({me.fingerprint})", file=sys.stderr)
    print(me.fingerprint if args.fingerprint else me.public_key_b64)
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    from agent import identity
    from agent.wire.keys import decode_key
    home = resolve_home(args)
    key = decode_key(args.public_key)
    if args.address is not None:
        identity.parse_address(args.address)  # a bad address fails before anything is written
    peer, added = identity.trust_peer(home, args.name, key, args.address)
    where = f" at {peer.address}" if peer.address else " (no address: it can only call us)"
    print(f"{'trusted' if added else 'updated'} {peer.name} {peer.fingerprint}{where}")
    return 0


def cmd_untrust(args: argparse.Namespace) -> int:
    from agent import identity
    home = resolve_home(args)
    if not identity.untrust_peer(home, args.name):
        raise UserError(f"no trusted peer named {args.name!r} in {home / identity.PEERS_FILE}")
    print(f"removed {args.name}")
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    from agent import identity
    home = resolve_home(args)
    peers = identity.load_peers(home)
    if args.json:
        print(json.dumps([{"name": p.name, "address": p.address,
                           "public_key": p.public_key_b64, "fingerprint": p.fingerprint}
                          for p in peers], indent=2))
        return 0
    if not len(peers):
        print(f"no trusted peers in {home / identity.PEERS_FILE}; add one with "
              f"ferry trust NAME PUBKEY --address HOST:PORT", file=sys.stderr)
        return 0
    rows = [("NAME", "ADDRESS", "PUBLIC KEY")]
    rows += [(p.name, p.address or "-", p.public_key_b64) for p in peers]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, address, key in rows:
        print(f"{name:<{widths[0]}}  {address:<{widths[1]}}  {key}")
    return 0
