#!/usr/bin/env python3
"""Open N PostgreSQL client connections and hold them idle (for scripts/bench.sh).

  idle_clients.py HOST PORT USER PASSWORD DATABASE N [PARALLEL]

Each connection does the real startup handshake (SCRAM-SHA-256, MD5 or cleartext, as the
server asks) and waits for ReadyForQuery. When all N are up (or failed), prints one line
"connected OK FAILED SECONDS" on stdout, then holds every connection open until SIGTERM or
SIGINT, closes them, and exits 0 if none failed. Standard library only; raises its own open-files limit.
"""

import asyncio
import base64
import hashlib
import hmac
import os
import resource
import signal
import struct
import sys
import time

_SALTED = {}


def salted_password(password, salt, iterations):
    key = (salt, iterations)
    if key not in _SALTED:
        _SALTED[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return _SALTED[key]


async def read_msg(reader):
    head = await reader.readexactly(5)
    tag, length = head[:1], struct.unpack("!i", head[1:])[0]
    body = await reader.readexactly(length - 4)
    return tag, body


def msg(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body


async def connect(host, port, user, password, database):
    reader, writer = await asyncio.open_connection(host, port)
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    writer.write(struct.pack("!ii", len(params) + 8, 196608) + params)
    await writer.drain()
    nonce = client_first_bare = None
    while True:
        tag, body = await read_msg(reader)
        if tag == b"E":
            raise RuntimeError(body.replace(b"\0", b" ").decode(errors="replace"))
        if tag == b"Z":
            return reader, writer
        if tag != b"R":
            continue
        code = struct.unpack("!i", body[:4])[0]
        if code == 0:
            continue
        if code == 3:  # cleartext
            writer.write(msg(b"p", password.encode() + b"\0"))
        elif code == 5:  # md5
            inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
            writer.write(msg(b"p", b"md5" + outer.encode() + b"\0"))
        elif code == 10:  # SASL: SCRAM-SHA-256
            nonce = base64.b64encode(os.urandom(18)).decode()
            client_first_bare = "n=,r=" + nonce
            first = ("n,," + client_first_bare).encode()
            writer.write(
                msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
            )
        elif code == 11:  # SASLContinue
            server_first = body[4:].decode()
            attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
            if not attrs["r"].startswith(nonce):
                raise RuntimeError("server nonce does not extend ours")
            salted = salted_password(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
            client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
            stored_key = hashlib.sha256(client_key).digest()
            final_bare = "c=biws,r=" + attrs["r"]
            auth = ",".join([client_first_bare, server_first, final_bare]).encode()
            sig = hmac.new(stored_key, auth, hashlib.sha256).digest()
            proof = bytes(a ^ b for a, b in zip(client_key, sig))
            final = final_bare + ",p=" + base64.b64encode(proof).decode()
            writer.write(msg(b"p", final.encode()))
        elif code == 12:  # SASLFinal
            continue
        else:
            raise RuntimeError("unsupported authentication request %d" % code)
        await writer.drain()


async def main(argv):
    if len(argv) not in (7, 8):
        sys.stderr.write(__doc__)
        return 2
    host, port, user, password, database = argv[1], int(argv[2]), argv[3], argv[4], argv[5]
    n = int(argv[6])
    parallel = int(argv[7]) if len(argv) == 8 else 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 100
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sem = asyncio.Semaphore(parallel)
    conns, errors = [], []

    async def one():
        async with sem:
            try:
                conns.append(
                    await asyncio.wait_for(connect(host, port, user, password, database), 60)
                )
            except Exception as e:  # noqa: BLE001 - every failure counts, whatever it is
                errors.append(repr(e))

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.monotonic() - start
    print("connected %d %d %.2f" % (len(conns), len(errors), elapsed), flush=True)
    for e in sorted(set(errors))[:5]:
        sys.stderr.write("idle_clients: %s\n" % e)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for _, w in conns:
        try:
            w.write(msg(b"X", b""))
            w.close()
        except Exception:  # noqa: BLE001
            pass
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv)))
