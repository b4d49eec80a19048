#!/usr/bin/env python3
"""A minimal sotto JSON-RPC client: send one message, then print events until Ctrl-C.

Usage: rpc_client.py [--home DIR] [--passphrase-file FILE] [--sotto PATH] USER MESSAGE
"""
import argparse
import json
import subprocess
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home")
    parser.add_argument("--passphrase-file")
    parser.add_argument("--sotto", default="sotto", help="path to the sotto binary")
    parser.add_argument("user")
    parser.add_argument("message")
    args = parser.parse_args()

    cmd = [args.sotto]
    if args.home:
        cmd += ["--home", args.home]
    if args.passphrase_file:
        cmd += ["--passphrase-file", args.passphrase_file]
    cmd += ["rpc", "--stdio"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    next_id = 0
    pending_events = []

    def call(method, params=None):
        nonlocal next_id
        next_id += 1
        request = {"jsonrpc": "2.0", "id": next_id, "method": method, "params": params or {}}
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            reply = json.loads(line)
            if reply.get("id") == next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']['message']} (exit class {reply['error'].get('data', {}).get('exit')})")
                return reply["result"]
            pending_events.append(reply["params"])  # an event that came first
        raise RuntimeError("sotto rpc ended")

    def show(event):
        kind = event["type"]
        if kind == "message":
            m = event["message"]
            print(f"event {event['event_id']}: message from {m['peer']}: {m['body']}")
        elif kind == "presence":
            print(f"event {event['event_id']}: presence {event['peer']} {'online' if event['online'] else 'offline'}")
        elif kind == "delivered":
            print(f"event {event['event_id']}: delivered {event['id']}")
        else:
            print(f"event {event['event_id']}: {kind} {json.dumps(event)}")

    try:
        call("subscribe")
        sent = call("send", {"to": args.user, "body": args.message})
        print(f"sent: {sent['state']} (id {sent['id']})")
        for event in pending_events:
            show(event)
        for line in proc.stdout:
            show(json.loads(line)["params"])
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        proc.stdin.close()
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
