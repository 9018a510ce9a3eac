"""The worker and meterctl take every mtr:* key name from
include/meter_schema.h (issue 11): no string in worker/ spells a key, in a
Redis command ("HGET mtr:...") or on its own ("mtr:..."), outside comments.
The header itself is checked against docs/redis-schema.md by
test_schema_header.py."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = ROOT / "worker"

# a string literal that starts with a key, or a command word and then a key
SPELLED = re.compile(r'"(?:[A-Z]+ )?mtr:')


def code_lines(path):
    """(number, line) of a C file with its comments blanked out."""
    code = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m[0]),
                  path.read_text(), flags=re.S)
    return enumerate(code.splitlines(), 1)


def test_worker_sources_spell_no_key_themselves():
    files = sorted(WORKER.glob("*/*.[ch]"))
    hits = ["%s:%d: %s" % (f.relative_to(WORKER), no, line.strip())
            for f in files for no, line in code_lines(f)
            if SPELLED.search(line)]

    assert len(files) == 82, [str(f) for f in files]
    assert hits == []


def test_the_check_sees_a_spelled_key(tmp_path):
    f = tmp_path / "x.c"
    f.write_text('/* "mtr:hours" in a comment */\n'
                 'rp = meter_redis_cmd(r, "ZRANGE mtr:hours 0 -1");\n'
                 'hash = "mtr:bypc";\n'
                 'rp = meter_redis_cmd(r, "ZRANGE " MTR_HOURS " 0 -1");\n')
    assert [no for no, line in code_lines(f) if SPELLED.search(line)] \
        == [2, 3]
