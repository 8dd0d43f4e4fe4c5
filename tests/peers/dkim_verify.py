#!/usr/bin/env python3
"""usage: dkim_verify.py KEY_TXT < message

Verifies the message's DKIM-Signature with dkimpy against the public key in KEY_TXT (the
DNS record opendkim-genkey wrote), with no DNS: prints "pass" and exits 0, or "fail" and 1."""
import re
import sys

import dkim

record = "".join(re.findall(r'"([^"]*)"', open(sys.argv[1]).read()))
message = sys.stdin.buffer.read()
ok = dkim.verify(message, dnsfunc=lambda name, timeout=5: record.encode())
print("pass" if ok else "fail")
sys.exit(0 if ok else 1)
