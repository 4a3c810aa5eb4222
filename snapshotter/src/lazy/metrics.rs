//! Prometheus metrics of the lazy path. One [`LazyMetrics`] is shared by every layer; the
//! daemon registers it into its registry (under the `lazy` prefix) with
//! [`LazyMetrics::register`].

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use super::Source;

/// Label set naming where a block came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `cache`, `peer` or `registry`.
    pub source: String,
}

fn new_latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: from a memory hit to a slow registry.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// Counters and histograms of the lazy path.
#[derive(Clone, Debug)]
pub struct LazyMetrics {
    /// Blocks obtained, by source (`cache` counts hits of reads that needed the block).
    pub blocks: Family<SourceLabels, Counter>,
    /// Stored bytes obtained, by source.
    pub bytes: Family<SourceLabels, Counter>,
    /// Latency of one block fetch from a remote source, in seconds, by source.
    pub fetch_seconds: Family<SourceLabels, Histogram, fn() -> Histogram>,
    /// Blocks the upstream peer failed to deliver that were fetched from the registry instead.
    pub peer_fallbacks: Counter,
    /// Blocks whose bytes did not match their TOC digest (from any source, disk included).
    pub digest_failures: Counter,
    /// Blocks served to child nodes.
    pub served_blocks: Counter,
    /// Stored bytes served to child nodes.
    pub served_bytes: Counter,
    /// Peer requests answered with an error status.
    pub serve_errors: Counter,
    /// Blocks fetched by background prefetch.
    pub prefetched_blocks: Counter,
    /// Layers evicted from the disk cache to stay within the quota.
    pub evicted_layers: Counter,
    /// Blocks obtained from the sibling (counted under `peer` in `blocks` too).
    pub sibling_blocks: Counter,
    /// Blocks fetched because the parent's start order named them (docs/lazy.md, "Start
    /// order"), before this node's container read them.
    pub followed_blocks: Counter,
}

impl Default for LazyMetrics {
    fn default() -> Self {
        LazyMetrics {
            blocks: Family::default(),
            bytes: Family::default(),
            fetch_seconds: Family::new_with_constructor(new_latency_histogram),
            peer_fallbacks: Counter::default(),
            digest_failures: Counter::default(),
            served_blocks: Counter::default(),
            served_bytes: Counter::default(),
            serve_errors: Counter::default(),
            prefetched_blocks: Counter::default(),
            evicted_layers: Counter::default(),
            sibling_blocks: Counter::default(),
            followed_blocks: Counter::default(),
        }
    }
}

impl LazyMetrics {
    /// Registers every metric into `registry` (e.g. `r.sub_registry_with_prefix("lazy")`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("blocks", "Blocks obtained, by source", self.blocks.clone());
        registry.register(
            "bytes",
            "Stored block bytes obtained, by source",
            self.bytes.clone(),
        );
        registry.register(
            "fetch_seconds",
            "Latency of one block fetch from a remote source",
            self.fetch_seconds.clone(),
        );
        registry.register(
            "peer_fallbacks",
            "Blocks the upstream peer failed to deliver, fetched from the registry instead",
            self.peer_fallbacks.clone(),
        );
        registry.register(
            "digest_failures",
            "Blocks whose bytes did not match their TOC digest",
            self.digest_failures.clone(),
        );
        registry.register(
            "served_blocks",
            "Blocks served to child nodes",
            self.served_blocks.clone(),
        );
        registry.register(
            "served_bytes",
            "Stored block bytes served to child nodes",
            self.served_bytes.clone(),
        );
        registry.register(
            "serve_errors",
            "Peer requests answered with an error status",
            self.serve_errors.clone(),
        );
        registry.register(
            "prefetched_blocks",
            "Blocks fetched by background prefetch",
            self.prefetched_blocks.clone(),
        );
        registry.register(
            "evicted_layers",
            "Layers evicted from the disk cache to stay within the quota",
            self.evicted_layers.clone(),
        );
        registry.register(
            "sibling_blocks",
            "Blocks obtained from the sibling (also counted as peer blocks)",
            self.sibling_blocks.clone(),
        );
        registry.register(
            "followed_blocks",
            "Blocks fetched because the parent's start order named them",
            self.followed_blocks.clone(),
        );
    }

    /// Counts one block of `bytes` stored bytes obtained from `source`.
    pub fn obtained(&self, source: Source, bytes: u64) {
        let l = SourceLabels {
            source: source.as_str().to_string(),
        };
        self.blocks.get_or_create(&l).inc();
        self.bytes.get_or_create(&l).inc_by(bytes);
    }

    /// Records the latency of a fetch from `source`.
    pub fn fetch_latency(&self, source: Source, seconds: f64) {
        self.fetch_seconds
            .get_or_create(&SourceLabels {
                source: source.as_str().to_string(),
            })
            .observe(seconds);
    }

    /// Blocks obtained from `source` so far.
    pub fn blocks_from(&self, source: Source) -> u64 {
        self.blocks
            .get_or_create(&SourceLabels {
                source: source.as_str().to_string(),
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_names() {
        let m = LazyMetrics::default();
        let mut r = Registry::with_prefix("faasnet_snapshotter");
        m.register(r.sub_registry_with_prefix("lazy"));
        m.obtained(Source::Peer, 100);
        m.fetch_latency(Source::Registry, 0.01);
        m.peer_fallbacks.inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        for name in [
            "faasnet_snapshotter_lazy_blocks_total{source=\"peer\"} 1",
            "faasnet_snapshotter_lazy_bytes_total{source=\"peer\"} 100",
            "faasnet_snapshotter_lazy_fetch_seconds_count{source=\"registry\"} 1",
            "faasnet_snapshotter_lazy_peer_fallbacks_total 1",
            "faasnet_snapshotter_lazy_served_blocks_total 0",
        ] {
            assert!(out.contains(name), "{name} missing from:\n{out}");
        }
        assert_eq!(m.blocks_from(Source::Peer), 1);
    }
}
