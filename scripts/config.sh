# Sourced by the scripts in this directory: writes a tidemark config that starts from
# examples/tidemark.toml (the quick start: site-a primary, site-b secondary, pairs "log"
# and "data") with a few values changed.
#
#   example_config DEST EDIT...
#
# Each EDIT is one of
#   KEY=VALUE        a top-level key, e.g. mtu=9000
#   NAME.KEY=VALUE   a key of the [[system]] or [[pair]] called NAME (its name in the
#                    example, even if an earlier EDIT renames it), e.g.
#                    site-a.listen=127.0.0.1:17100, data.size=1GiB
#   NAME.KEY=        removes that key (then its default applies), e.g. site-b.nbd_listen=
#   -NAME            removes the whole [[system]] or [[pair]] called NAME, e.g. -log
# A value replaces the example's and keeps its quoting (strings stay strings). An EDIT
# that matches nothing is an error: the example and the script disagree.
# Needs python3 (3.6+; standard library only).

TM_EXAMPLE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/examples/tidemark.toml

example_config() {
    python3 - "$TM_EXAMPLE" "$@" <<'PY'
import re, sys

src, dest, edits = sys.argv[1], sys.argv[2], sys.argv[3:]
drop, sets = set(), {}
for e in edits:
    if e.startswith("-"):
        drop.add(e[1:])
        continue
    where, eq, value = e.partition("=")
    if not eq:
        sys.exit(f"example_config: {e!r} is not KEY=VALUE, NAME.KEY=VALUE or -NAME")
    section, _, key = where.rpartition(".")
    sets[(section, key)] = value
used = set()

# Blocks: the top level (section ""), then one per [[system]] / [[pair]] header, each
# named by its `name = "..."` line.
blocks = [["", []]]
for line in open(src, encoding="utf-8").read().splitlines():
    if re.match(r"\s*\[\[(system|pair)\]\]", line):
        blocks.append(["", [line]])
        continue
    m = re.match(r'\s*name\s*=\s*"([^"]*)"', line)
    if m and len(blocks) > 1 and not blocks[-1][0]:
        blocks[-1][0] = m.group(1)
    blocks[-1][1].append(line)

out = []
for name, lines in blocks:
    if name in drop:
        used.add(("-", name))
        continue
    for line in lines:
        m = re.match(r"(\s*)([A-Za-z_]+)(\s*=\s*)(.*)", line)
        if m and (name, m.group(2)) in sets:
            value = sets[(name, m.group(2))]
            used.add((name, m.group(2)))
            if value == "":
                continue
            if m.group(4).startswith('"'):
                value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            line = m.group(1) + m.group(2) + m.group(3) + value
        out.append(line)

missing = [f"-{n}" for n in drop if ("-", n) not in used]
missing += [f"{s + '.' if s else ''}{k}" for (s, k) in sets if (s, k) not in used]
if missing:
    sys.exit(f"example_config: not in {src}: {', '.join(missing)}")
with open(dest, "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
PY
}
