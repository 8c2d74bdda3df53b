#!/usr/bin/env bash
# A fresh, non-editable `pip install .` into an empty venv imports the package and runs `--help` of every entry
# point (python -m avllm_jax.<command> and the tools), from outside the source tree (nothing is imported from
# the checkout). Run it by hand: bash tools/check_install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -c constraints.txt "$root"
cd "$(mktemp -d)"
"$venv/bin/python" -c "import avllm_jax, sys; assert not avllm_jax.__file__.startswith('$root/avllm_jax'), avllm_jax.__file__"
failed=0
for module in train plan evaluate chat web serve cache_features; do
    if ! out=$("$venv/bin/python" -m "avllm_jax.$module" --help 2>&1) || ! grep -q "usage:" <<<"$out"; then
        echo "python -m avllm_jax.$module --help failed:"; echo "$out" | tail -5; failed=1
    fi
done
for tool in convert_hf_weights export_hf cache_features; do
    if ! out=$("$venv/bin/python" "$root/tools/$tool.py" --help 2>&1) || ! grep -q "usage:" <<<"$out"; then
        echo "tools/$tool.py --help failed:"; echo "$out" | tail -5; failed=1
    fi
done
rm -rf "$(dirname "$venv")"
[ "$failed" = 0 ] && echo "check_install: pip install . imports, and every entry point's --help runs"
exit "$failed"
