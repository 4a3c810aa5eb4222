#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a fixed time and prints what each did.
#
#   hack/fuzz.sh [SECONDS per target, default 60] [TARGET...]
#
# Targets (fuzz/fuzz_targets/): toc_footer (footer, TOC frame, TOC payload and JSON,
# Toc::validate), converter (tar -> blocks, then decode back: must equal the input),
# block_decode (one block against a block table that may lie), peer_protocol (the
# snapshotter's peer protocol decoders).
#
# libFuzzer runs with -rss_limit_mb and -malloc_limit_mb (an allocation a hostile input can
# inflate is a finding), -timeout (a hang is a finding) and -max_len. Corpora grow under
# fuzz/corpus/<target>/ (only the seed-* files are committed); a crash, leak, timeout or
# over-allocation leaves its input in fuzz/artifacts/<target>/ and makes this script exit 1.
# Reproduce one with: cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
#
# Needs a nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
all=(toc_footer converter block_decode peer_protocol)
targets=("${@:-${all[@]}}")

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! rustup toolchain list | grep -q '^nightly'; then
	echo "hack/fuzz.sh: needs a nightly toolchain: rustup toolchain install nightly" >&2
	exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
	echo "== installing cargo-fuzz"
	cargo install cargo-fuzz --locked
fi

# Per-target input size limit: TOC tails and peer messages are small; the converter needs
# room for a few 64 KiB blocks.
max_len() {
	case "$1" in
	converter) echo 262144 ;;
	toc_footer) echo 65536 ;;
	block_decode) echo 140000 ;;
	*) echo 8192 ;;
	esac
}

echo "== building fuzz targets"
(cd fuzz && for t in "${targets[@]}"; do cargo +nightly fuzz build "$t" >/dev/null; done)

# LeakSanitizer reports std's per-thread channel context of the converter's worker threads
# (thread-local storage freed by the exiting thread after the check ran): not a leak of
# ours, and growth that matters is caught by -rss_limit_mb/-malloc_limit_mb anyway.
extra_flags() {
	case "$1" in
	converter) echo -detect_leaks=0 ;;
	esac
}

logdir="fuzz/logs"
mkdir -p "$logdir"
failed=0
summary=()
for t in "${targets[@]}"; do
	mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
	before=$(find "fuzz/artifacts/$t" -type f | wc -l)
	echo "== $t: ${secs}s"
	set +e
	(cd fuzz && cargo +nightly fuzz run "$t" "corpus/$t" -- \
		-max_total_time="$secs" \
		-max_len="$(max_len "$t")" \
		-rss_limit_mb=2048 \
		-malloc_limit_mb=512 \
		-timeout=10 \
		-print_final_stats=1 $(extra_flags "$t")) >"$logdir/$t.log" 2>&1
	rc=$?
	set -e
	runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logdir/$t.log" | grep -o '[0-9]*$' | tail -n 1)
	after=$(find "fuzz/artifacts/$t" -type f | wc -l)
	corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
	crashes=$((after - before))
	if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
		crashes=1 # libFuzzer failed without leaving an artifact (e.g. a build problem)
	fi
	line=$(printf '%-14s runs=%-10s corpus=%-6s crashes=%s' "$t" "${runs:-?}" "$corpus" "$crashes")
	summary+=("$line")
	echo "$line"
	if [ "$crashes" -ne 0 ]; then
		failed=1
		grep -E 'ERROR: libFuzzer|panicked at|SUMMARY:|Test unit written' "$logdir/$t.log" | head -n 8 || true
		echo "   (full log: $logdir/$t.log)"
	fi
done

echo "== summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
exit "$failed"
