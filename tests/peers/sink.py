"""A next-hop SMTP server for tests (aiosmtpd): records every message and its envelope to a
directory, refuses recipients that start with a given prefix (550 5.1.1), and can require
STARTTLS.

usage: sink.py PORT DUMP_DIR [--reject PREFIX] [--tls CERT KEY]
Writes N.eml (the message as received) and N.json (mail_from, rcpt_tos, tls) per message, and
prints "ready" once listening.
"""
import argparse
import json
import os
import ssl
import sys
import threading
import time

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, dump, reject):
        self.dump = dump
        self.reject = reject
        self.count = 0
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.reject and address.startswith(self.reject):
            return "550 5.1.1 <%s>: Recipient address rejected: no such user" % address
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.count += 1
            n = self.count
        base = os.path.join(self.dump, "%06d" % n)
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": session.ssl is not None,
        }
        with open(base + ".json", "w") as f:
            json.dump(meta, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        return "250 2.0.0 OK queued as %d" % n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("dump")
    p.add_argument("--reject", default="")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    a = p.parse_args()
    kwargs = {}
    if a.tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.tls[0], a.tls[1])
        kwargs = {"tls_context": ctx, "require_starttls": True}
    c = Controller(Handler(a.dump, a.reject), hostname="127.0.0.1", port=a.port,
                   decode_data=False, server_hostname="sink.test", **kwargs)
    c.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        c.stop()


if __name__ == "__main__":
    sys.exit(main())
