#!/usr/bin/env bash
# Runs set-up command N (1 or 2) exactly as README.md shows it, so CI tests what a newcomer pastes.
# In README.md each command is the first line of the code block that follows `<!-- setup-command-N -->`.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: readme-command.sh 1|2}
cmd=$(awk -v n="$n" '$0 == "<!-- setup-command-" n " -->" {f=1; next} f && /^```/ {next} f {print; exit}' README.md)
if [ -z "$cmd" ]; then echo "README.md has no setup command $n" >&2; exit 2; fi
echo "+ $cmd"
bash -euo pipefail -c "$cmd"
