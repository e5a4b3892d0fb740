#!/usr/bin/env bash
# Copy each live database in runs/ into experiments/db/ with SQLite's online
# backup, which gives a consistent copy even while `piscale eval` writes.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p experiments/db
for live in runs/*.sqlite; do
  [[ -e $live ]] || continue
  python3 - "$live" "experiments/db/$(basename "$live")" <<'PY'
import os, sqlite3, sys
source, target = sys.argv[1:]
src, dst = sqlite3.connect(source), sqlite3.connect(target + ".tmp")
src.backup(dst)
dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
src.close(); dst.close()
os.replace(target + ".tmp", target)
PY
  echo "snapshot: $live -> experiments/db/$(basename "$live")"
done
