#!/usr/bin/env bash
# Builds every cargo-fuzz target (fuzz/fuzz_targets/) once and runs each
# for FUZZ_SECONDS seconds (default 30) from the committed seed corpus and
# the regression inputs. Fails when any target crashes; prints execs/s and
# coverage per target at the end. See fuzz/README.md.
#
# Runs on the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc accept
# the -Z flags cargo fuzz passes (-Zsanitizer=address and the coverage
# options); the AddressSanitizer runtime ships with stable's rust-std.
# New inputs go to a temporary copy of the corpus, so the tree stays clean;
# a crashing input is kept in fuzz/artifacts/<target>/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
export RUSTC_BOOTSTRAP=1
cargo=(cargo)
if command -v rustup >/dev/null 2>&1; then
  cargo=(cargo "+${FUZZ_TOOLCHAIN:-stable}")
fi
build_opts=()
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  build_opts+=(--target-dir "$CARGO_TARGET_DIR")
fi

if ! "${cargo[@]}" fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz is missing (scripts/install-deps.sh installs it)" >&2
  exit 1
fi
mapfile -t targets < <("${cargo[@]}" fuzz list)
if [ "${#targets[@]}" -eq 0 ]; then
  echo "fuzz: no fuzz targets found" >&2
  exit 1
fi

# cargo fuzz build has no --locked (rust-fuzz/cargo-fuzz#312): resolve the
# fuzz crate with --locked first, so a stale fuzz/Cargo.lock fails here
# instead of being rewritten by the build.
if ! "${cargo[@]}" metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
  echo "fuzz: fuzz/Cargo.lock is not current; run cargo metadata --manifest-path fuzz/Cargo.toml and commit it" >&2
  exit 1
fi
start=$(date +%s)
"${cargo[@]}" fuzz build "${build_opts[@]}"
built=$(date +%s)
echo "fuzz: built ${#targets[@]} targets in $((built - start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for t in "${targets[@]}"; do
  corpus="$work/corpus-$t"
  mkdir -p "$corpus"
  seeds=(fuzz/corpus/"$t")
  if [ -d fuzz/corpus/"$t" ]; then
    cp -r fuzz/corpus/"$t"/. "$corpus"/
  fi
  if [ -d fuzz/regressions/"$t" ]; then
    seeds+=(fuzz/regressions/"$t")
  fi
  echo "=== fuzz $t (${seconds} s)"
  log="$work/$t.log"
  rc=0
  "${cargo[@]}" fuzz run "${build_opts[@]}" "$t" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E '^(INFO: seed corpus|#[0-9]+[[:space:]]+(INITED|DONE))' "$log" || true
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[^ ]+' "$log" | tail -n1)
  pcs=$(sed -n 's/^INFO: Loaded 1 PC tables (\([0-9]*\) PCs).*/\1/p' "$log" | tail -n1)
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    grep -A6 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)|SUMMARY:' "$log" | head -n 60 || true
    grep -E 'Test unit written to|^Base64:' "$log" || tail -n 30 "$log"
    status=FAILED
  else
    status=ok
  fi
  summary+=("$(printf '%-14s %-6s %10s execs %8s execs/s  %s (of %s PCs)' \
    "$t" "$status" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${pcs:-?}")")
done
end=$(date +%s)

echo
echo "=== fuzz summary (${seconds} s per target)"
printf '%s\n' "${summary[@]}"
echo "fuzz: build $((built - start)) s, runs $((end - built)) s, total $((end - start)) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/; see fuzz/README.md)" >&2
  exit 1
fi
