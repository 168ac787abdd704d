#!/usr/bin/env bash
# Runs the Autobahn testsuite's fuzzingclient (cases 1-10) against gateway/examples/echo.rs.
# Needs Python 2.7 (pyenv ships 2.7.18 on our machines); skips with a message without it.
set -euo pipefail
cd "$(dirname "$0")/.."

py=""
for cand in "$(pyenv root 2>/dev/null)/versions/2.7.18/bin/python2.7" "$(command -v python2.7 || true)"; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then py="$cand"; break; fi
done
if [ -z "$py" ]; then
  echo "conformance: SKIPPED - Python 2.7 not found (the Autobahn testsuite needs it)."
  exit 0
fi

# absolute: setup.py-based packages resolve a relative --prefix against their build dir
prefix="$PWD/.tools/autobahn"
if [ ! -x "$prefix/bin/wstest" ]; then
  # --ignore-installed keeps pip from upgrading (and breaking) that Python's setuptools.
  "$py" -m pip install --quiet --ignore-installed --prefix "$prefix" autobahntestsuite
fi
site=$(cd "$(ls -d "$prefix"/lib/python2.7/site-packages)" && pwd)

cargo build --quiet -p gateway --example echo
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./target/debug/examples/echo "127.0.0.1:$port" 2>/dev/null &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true' EXIT
sleep 1

out="$PWD/target/autobahn"
mkdir -p "$out"
cat > "$out/fuzzingclient.json" <<JSON
{
  "outdir": "$out/reports",
  "servers": [{"agent": "gateway-echo", "url": "ws://127.0.0.1:$port"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "8.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
# addsitedir (not PYTHONPATH) so that the zope namespace package's .pth file is honoured.
( cd "$out" && "$py" -c "import site, sys; site.addsitedir('$site'); sys.argv[0] = 'wstest'
from autobahntestsuite.wstest import run; run()" -m fuzzingclient -s fuzzingclient.json ) > "$out/wstest.log" 2>&1

python3 - "$out/reports/index.json" <<'PY'
import json, sys, collections
index = json.load(open(sys.argv[1]))
counts = collections.Counter()
failed = []
for agent, cases in index.items():
    for case, r in cases.items():
        counts[r["behavior"]] += 1
        if r["behavior"] == "FAILED" or r.get("behaviorClose") == "FAILED":
            failed.append(case)
print("autobahn fuzzingclient, cases 1-10:", dict(counts))
if failed:
    print("FAILED cases:", " ".join(sorted(failed)))
    sys.exit(1)
PY
