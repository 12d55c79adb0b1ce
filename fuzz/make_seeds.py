#!/usr/bin/env python3
"""Writes the committed seed corpus of the fuzz targets.

Run from the fuzz directory: python3 make_seeds.py. The decide seeds are
steps of two little-endian bytes (clock advance in 7 ms units) followed by
one length-delimited RateLimitRequest, encoded here by hand.
"""
import os
import struct


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


def field(number, wire, payload):
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def text(number, value):
    return field(number, 2, value.encode())


def descriptor(entries, hits=None, negative=False, limit=None):
    out = b"".join(field(1, 2, text(1, k) + text(2, v)) for k, v in entries)
    if limit is not None:
        per_unit, unit, multiplier = limit
        body = field(1, 0, per_unit) + field(2, 0, unit)
        if multiplier is not None:
            body += field(3, 2, field(1, 0, multiplier))
        out += field(2, 2, body)
    if hits is not None:
        out += field(3, 2, field(1, 0, hits) if hits else b"")
    if negative:
        out += field(4, 0, 1)
    return out


def request(domain, descriptors, hits=0):
    out = text(1, domain) + b"".join(field(2, 2, d) for d in descriptors)
    if hits:
        out += field(3, 0, hits)
    return out


def step(advance, message):
    return struct.pack("<H", advance) + varint(len(message)) + message


def write(target, name, data):
    os.makedirs(f"corpus/{target}", exist_ok=True)
    with open(f"corpus/{target}/seed-{name}", "wb") as f:
        f.write(data)


fikra_check = request("fikra", [
    descriptor([("api_key", "K1"), ("tier", "trusted"), ("meter", "requests")]),
    descriptor([("api_key", "K1"), ("meter", "tokens"), ("request_id", "r1")], hits=900),
])
fikra_report = request("fikra", [
    descriptor([("api_key", "K1"), ("meter", "tokens"), ("phase", "report"), ("request_id", "r1")], hits=1200),
])
write("decide", "fikra-check-report", step(0, fikra_check) + step(10, fikra_report) + step(3, fikra_report))
write("decide", "edge-shadow-burst", b"".join(step(20, request("edge", [
    descriptor([("k", "a"), ("s", "b")]),
    descriptor([("k", "a")], hits=3),
])) for _ in range(4)))
write("decide", "edge-overrides", step(0, request("edge", [
    descriptor([("x", "y")], limit=(5, 2, None)),
    descriptor([("p", "prefix")], limit=(4294967295, 6, 4294967295)),
    descriptor([("t", "v"), ("tier", "free")]),
    descriptor([("u", "open")]),
])))
write("decide", "edge-credit-and-peek", step(1, request("edge", [descriptor([("k", "c")], hits=8)]))
      + step(1, request("edge", [descriptor([("k", "c")], hits=5, negative=True)]))
      + step(1, request("edge", [descriptor([("k", "c")], hits=0)])))
write("decide", "edge-huge-reports", step(0, request("edge", [
    descriptor([("k", "a"), ("phase", "report")], hits=2**64 - 1),
    descriptor([("k", "a"), ("phase", "report"), ("request_id", "r")], hits=2**64 - 1),
])))
write("decide", "odd-shapes", step(0, request("", [descriptor([("k", "a")])]))
      + step(0, request("edge", []))
      + step(0, request("edge", [descriptor([])], hits=4294967295))
      + step(0, request("edge", [descriptor([("k", "é日本\x00{}:\n" * 10)])])))

with open("../deploy/config/fikra.yaml", "rb") as f:
    write("config_parse", "fikra", f.read())
with open("../tests/fixtures/llm.yaml", "rb") as f:
    write("config_parse", "llm", f.read())
write("config_parse", "edge", b"""domain: edge
shadow_mode: false
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10, burst: 20}
  - key: path
    value: /login*
    rate_limit: {unit: minute, requests_per_unit: 5, unit_multiplier: 30, name: login}
    descriptors:
      - key: user
        value: admin
        rate_limit: {unlimited: true}
""")
write("config_parse", "invalid", b"""domain: ""
descriptors:
  - key: k
    rate_limit: {unit: fortnight, requests_per_unit: -3}
""")

# The answer target reads raw bytes through arbitrary: a few fixed patterns.
write("answer", "zeros", bytes(64))
write("answer", "ones", bytes([0xFF]) * 64)
write("answer", "mixed", bytes(range(256)))
