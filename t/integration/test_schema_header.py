"""include/meter_schema.h against docs/redis-schema.md: every mtr:* key the
contract names has its macro, and the header names no key the contract does
not.  The C preprocessor itself expands the macros, so what is checked is
what the module and the worker compile."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEADER = ROOT / "include" / "meter_schema.h"
SCHEMA = ROOT / "docs" / "redis-schema.md"

# the document's placeholders, as the header's printf formats spell them
PLACEHOLDERS = [
    ("{KH}", "{%s}"), ("{CUSTOMER}", "{%s}"), ("{EPOCH}", "{%s}"),
    (":SID", ":%s"), (":HOUR", ":%s"), (":PART", ":%u"),
    (":PSTART", ":%lld"), (":ID", ":%s"), (":PROVIDER:EVENT_ID", ":%s:%s"),
    (":NAME:UPERIOD", ":%s:%s"), (":YYYYMM", ":%s"), (":tmp:N", ":tmp:%u"),
    (":SUBSCRIPTION", ":%s"),
]


def header_keys(tmp_path):
    """Every MTR_* string macro of the header, expanded by cpp."""
    names = re.findall(r"^#define\s+(MTR_\w+)\s+\S", HEADER.read_text(),
                       re.M)
    probe = tmp_path / "probe.c"
    probe.write_text('#include "meter_schema.h"\n' + "".join(
        "@%d@ %s\n" % (i, n) for i, n in enumerate(names)))
    out = subprocess.run(["cpp", "-P", "-I", str(HEADER.parent), str(probe)],
                         check=True, capture_output=True, text=True).stdout
    keys = {}
    for line in out.splitlines():
        m = re.match(r'^@(\d+)@ (".*")$', line.strip())
        if m:
            # adjacent literals are one string, as in C
            keys[names[int(m.group(1))]] = "".join(
                re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(2)))
    return keys


def doc_keys():
    """Every full key name in the document, in the header's format."""
    found = set()
    for name in re.findall(r"`(mtr:[^`\s\[]*)`", SCHEMA.read_text()):
        for a, b in PLACEHOLDERS:
            name = name.replace(a, b)
        found.add(name)
    return found


def test_every_documented_key_has_a_macro(tmp_path):
    keys = header_keys(tmp_path)
    values = set(keys.values())

    # prefixes and shorthands of the prose ("mtr:u", "mtr:b:{KH}:H") are
    # not keys
    docs = {k for k in doc_keys()
            if k not in ("mtr:", "mtr:u", "mtr:b", "mtr:ckeys", "mtr:used",
                         "mtr:b:{%s}:H")}

    assert len(docs) == 46, sorted(docs)
    missing = sorted(docs - values)
    assert missing == []


def test_the_header_names_no_undocumented_key(tmp_path):
    keys = header_keys(tmp_path)
    docs = doc_keys()

    full = {n: v for n, v in keys.items()
            if v.startswith("mtr:") and not n.endswith(("_PRE", "_PREFIX"))}

    assert len(full) == 46, sorted(full)
    extra = sorted(n for n, v in full.items() if v not in docs)
    assert extra == []


def test_prefixes_start_their_formats(tmp_path):
    keys = header_keys(tmp_path)

    pairs = [(n, n[:-len("_PRE")] + "_FMT") for n in keys
             if n.endswith("_PRE")]

    assert len(pairs) == 24
    for pre, fmt in pairs:
        assert keys[fmt].startswith(keys[pre]), (pre, fmt)


def test_module_sources_spell_no_key_themselves():
    # the Lua script is verbatim from the document, its comment included
    src = ROOT / "ngx_http_meter_module" / "src"
    files = sorted(src.glob("*.[ch]"))
    hits = []
    for f in files:
        code = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m[0]),
                      f.read_text(), flags=re.S)
        for no, line in enumerate(code.splitlines(), 1):
            if '"mtr:' in line and "-- KEYS[1] = mtr:u:" not in line:
                hits.append("%s:%d: %s" % (f.name, no, line.strip()))

    assert len(files) == 20       # + _variables/_quota.c, _gauge.c, _unique.c
    assert hits == []
