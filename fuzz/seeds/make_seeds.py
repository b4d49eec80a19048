#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/seeds/<target>/.

The seeds are the public test vectors of keys/test-vectors/ (formats in keys/README.md),
plus messages built here from the same fixture values, laid out as each target reads
its input (see the comment at the top of each file in fuzz/fuzz_targets/). Run it again
after a vector or a target's input layout changes; the files it writes are committed.
"""

import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent
VECTORS = ROOT.parent.parent / "keys" / "test-vectors"


def vector(name):
    return json.loads((VECTORS / name).read_text())


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string(s):
    b = s.encode()
    return varint(len(b)) + b


def names(*users):
    return varint(len(users)) + b"".join(string(u) for u in users)


def message(tag, body=b""):
    return b"\x01" + varint(tag) + body


def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


wire = vector("wire.json")
presence = vector("presence.json")
peer = vector("peer.json")
idfile = vector("identity-file.json")
addresses = vector("server-address.json")

alice_key = bytes.fromhex(presence["record"]["identity_key"])
alice_noise = bytes.fromhex(presence["record"]["noise_key"])
alice_binding = bytes.fromhex(presence["record"]["noise_signature"])
payload = bytes.fromhex(presence["payload"])
signature = bytes.fromhex(presence["signature"])
signed = varint(len(payload)) + payload + signature
proof = bytes(range(64))

# wire_frame: a cap selector, then the frame.
for i, f in enumerate(wire["frames"] + wire["frame_must_fail"]):
    for pick in range(7):
        write("wire_frame", f"vector-{i}-cap-{pick}", bytes([pick]) + bytes.fromhex(f["frame"]))

# rendezvous_request: one message.
for r in wire["requests"]:
    write("rendezvous_request", f"vector-{r['kind'].lower()}", bytes.fromhex(r["message"]))
for i, u in enumerate(wire["unknown"] + wire["message_must_fail"]):
    target = "rendezvous_request" if u["direction"] == "request" else "rendezvous_response"
    write(target, f"vector-edge-{i}", bytes.fromhex(u["message"]))
credentials = string("alice") + string("correct horse battery") + alice_key + alice_noise + alice_binding + proof
write("rendezvous_request", "register", message(1, credentials))
write("rendezvous_request", "login", message(2, credentials))
write("rendezvous_request", "watch", message(8, names("bob", "carol", "dave_01")))
write("rendezvous_request", "watch-claims-too-many", message(8, varint(2**32) + string("bob")))

# rendezvous_response: one message.
for r in wire["responses"]:
    write("rendezvous_response", f"vector-{r['kind'].lower()}", bytes.fromhex(r["message"]))
write("rendezvous_response", "logged-in", message(2, b"\x01"))
write("rendezvous_response", "published-v6", message(4, b"\x01" + bytes(15) + b"\x01" + varint(4433)))
account = string("alice") + alice_key + alice_noise + alice_binding
write("rendezvous_response", "account-offline", message(6, account + b"\x00"))
write("rendezvous_response", "account-online", message(6, account + b"\x01" + signed))
write("rendezvous_response", "online", message(7, names("alice", "bob") + b"\x00"))
write("rendezvous_response", "watching", message(9, names("bob")))
write("rendezvous_response", "presence-changed", message(10, string("bob") + b"\x01"))
for refusal in range(19):
    body = varint(refusal) + (varint(30) if refusal == 8 else b"")
    write("rendezvous_response", f"refused-{refusal}", message(8, body))

# peer_frames: 0 preamble, 1 DialerHello, 2 PeerMessage.
write("peer_frames", "preamble", b"\x00" + bytes.fromhex(peer["preamble"]["bytes"]))
write("peer_frames", "preamble-for-bob-from-carol", b"\x00\x01" + string("carol") + string("bob"))
write("peer_frames", "dialer-hello", b"\x01" + bytes.fromhex(peer["dialer_hello"]["bytes"]))
for m in peer["messages"]:
    write("peer_frames", f"message-{m['kind'].lower()}", b"\x02" + bytes.fromhex(m["message"]))

# presence: mode, 32 bytes of clock choices, then the bytes.
# The clock: now (u64 LE), max_ttl (u16), max_skew (u16), has_last_seq, last_seq (u64),
# skew (u16), has_highest, highest (u64).
clock = struct.pack("<QHHBQHBQ", 1800000030, 300, 60, 1, 299, 5, 1, 300)
clock = clock + bytes(32 - len(clock))
write("presence", "wire-signed", b"\x00" + clock + signed)
write("presence", "signed-here", b"\x01" + clock + payload)
for i, case in enumerate(presence["must_fail"]):
    p = bytes.fromhex(case["payload"])
    s = bytes.fromhex(case["signature"])
    write("presence", f"vector-fail-{i}", b"\x00" + clock + varint(len(p)) + p + s)
    write("presence", f"signed-here-fail-{i}", b"\x01" + clock + p)

# idfile: the whole file.
write("idfile", "vector", bytes.fromhex(idfile["file"]))
for i, case in enumerate(idfile["must_fail"]):
    write("idfile", f"vector-fail-{i}", bytes.fromhex(case["file"]))

# control_rpc: one request line.
lines = [
    {"jsonrpc": "2.0", "id": 1, "method": "status"},
    {"jsonrpc": "2.0", "id": 2, "method": "send", "params": {"to": "bob", "body": "lunch at noon?"}},
    {"jsonrpc": "2.0", "id": "h", "method": "history", "params": {"peer": "alice", "limit": 5}},
    {"jsonrpc": "2.0", "id": 4, "method": "contacts"},
    {"jsonrpc": "2.0", "id": 5, "method": "online", "params": {}},
    {"jsonrpc": "2.0", "id": 6, "method": "lookup", "params": {"user": "Bob"}},
    {"jsonrpc": "2.0", "id": 7, "method": "contact.verify", "params": {"user": "bob", "safety_number": "12345 67890"}},
    {"jsonrpc": "2.0", "method": "send", "params": {"to": "bob", "body": "a notification"}},
    {"jsonrpc": "2.0", "id": None, "method": "nope"},
    {"jsonrpc": "1.0", "id": 9, "method": "status"},
]
for i, line in enumerate(lines):
    write("control_rpc", f"line-{i}", (json.dumps(line) + "\n").encode())

# handshake: mode byte first (see fuzz_targets/handshake.rs).
preamble = bytes.fromhex(peer["preamble"]["bytes"])
ts = struct.pack("<Q", 1800000000123456789)
write("handshake", "raw-message-1", b"\x00" + bytes([len(preamble)]) + preamble + bytes(96))
write("handshake", "crafted-hello", b"\x01\x00" + ts + b"\x00\x00" + struct.pack("<Q", 1900000000000000000) + bytes(16))
write("handshake", "crafted-hello-replayed", b"\x01\x00" + ts + b"\x00\x01" + ts + ts + bytes(16))
write("handshake", "crafted-foreign-key", b"\x01\x01" + bytes(range(32)) + ts + bytes(32))
write("handshake", "crafted-raw-payload", b"\x01\x04" + struct.pack("<H", 8) + b"not-json")
write("handshake", "raw-message-2", b"\x02" + bytes(48))
write("handshake", "crafted-message-2", b"\x03\x00" + bytes(16))
write("handshake", "crafted-message-2-payload", b"\x03\x01" + struct.pack("<H", 3) + b"abc")
write("handshake", "crafted-message-2-flipped", b"\x03\x02\x05\x00\x03")

# transport: a sequence of operations (see fuzz_targets/transport.rs).
chat = bytes.fromhex(peer["messages"][0]["message"])
ack = bytes.fromhex(peer["messages"][1]["message"])
body = b"hi bob"
op_chat = b"\x01" + bytes(range(16)) + b"\x01" + struct.pack("<QH", 1800000000123, len(body)) + body
op_ack = b"\x01" + bytes(range(16)) + b"\x00"
write("transport", "plaintexts", b"\x00" + struct.pack("<H", len(chat)) + chat + b"\x00" + struct.pack("<H", len(ack)) + ack)
write("transport", "messages-and-replies", op_chat + op_ack + b"\x06" + bytes(16) + b"\x00" + op_chat)
write("transport", "garbage-frame", op_ack + b"\x02" + struct.pack("<H", 40) + bytes(40))
write("transport", "flipped-bit", op_chat + b"\x03" + bytes(16) + b"\x00" + b"\x04\x00\x01")
write("transport", "replay", op_chat + b"\x04")
write("transport", "reordered", op_ack + b"\x05" + bytes(17))
write("transport", "cut-short", op_ack + b"\x07" + bytes(17) + b"\x10\x00")

# username, address, config: text.
for name in ["alice", "Alice_01", "x" * 32, "ab", "b\u00f6b", "bob\n"]:
    write("username", f"text-{len(name)}-{name.encode().hex()[:12]}", name.encode())
write("username", "postcard-alice", string("alice"))
for i, a in enumerate(addresses["addresses"] + addresses["must_fail"]):
    write("address", f"vector-{i}", a["address"].encode())
pin = "4d" * 32
write(
    "config",
    "all-keys",
    f'server = "sotto://127.0.0.1:7070#sha256:{pin}"\nlisten = "0.0.0.0:7777"\nnotify = "bell"\n'.encode(),
)
write("config", "empty", b"")
write("config", "unknown-key", b'sever = "x"\n')
write("config", "bad-listen", b'listen = "nowhere"\nnotify = "desktop"\n')
